"""The machine side of BigPool: PoolWorkerService driven through real machines.

Machines come from the ``test`` system (in-process) and the ``local`` system (processes);
either way the worker processes are real subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import importlib.util
import multiprocessing.pool
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dill
import psutil
import pytest
from pool_support import wait_until
from pool_worker_tasks import (
    add,
    announce_then_sum,
    exit_three,
    fail_on_three,
    failing_initializer,
    getpid,
    init_unless_file,
    init_worker,
    length,
    make_generator,
    noop,
    pid_then_sleep,
    read_initialized,
    rendezvous,
    say,
    square,
    wait_for_file,
)

import bigpool
import bigpool.worker
from bigpool import State
from bigpool.h2rpc.errors import RemoteTraceback, decode_error
from bigpool.machine import ServiceStartError
from bigpool.pool_wire import ResultDecoder, encode_chunk
from bigpool.worker import (
    ENCODE_ERROR,
    OK,
    SERVICE_NAME,
    TASK_ERROR,
    WORKER_DIED,
    Chunk,
    PoolWorkerService,
    result_details,
)

# --- helpers ------------------------------------------------------------------------------


def func_id(func: Callable[..., Any]) -> bytes:
    return hashlib.sha256(f"{func.__module__}.{func.__qualname__}".encode()).digest()[:16]


def chunk(chunk_id: int, func: Callable[..., Any], tasks: list[tuple[Any, ...]], *,
          star: bool = False, send_func: bool = True) -> Chunk:
    """A chunk of ``tasks`` (argument tuples; without ``star`` the one argument is sent bare)."""
    payload = tasks if star else [t[0] for t in tasks]
    return Chunk(chunk_id, func_id(func), dill.dumps(func) if send_func else None,
                 pickle.dumps(payload), star)


class Results:
    """Reads the results stream on a thread and parses its records into a queue."""

    def __init__(self, m: bigpool.Machine) -> None:
        self.reader = m.call(f"{SERVICE_NAME}.results")
        self.records: queue.Queue[Any] = queue.Queue()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        decoder = ResultDecoder()
        try:
            while data := self.reader.read_chunk():
                for result in decoder.feed(data):
                    payload: Any = bytes(result.payload)
                    if result.status in (ENCODE_ERROR, WORKER_DIED):
                        payload = result_details(result)
                    info = {"pid": result.pid, "seconds": result.seconds}
                    self.records.put((result.chunk_id, result.status, payload, info))
        except Exception as exc:
            self.records.put(exc)
        finally:
            self.ended.set()

    def get(self, n: int, timeout: float = 20) -> dict[int, tuple[int, Any, dict[str, Any]]]:
        """The next ``n`` records, by chunk id: ``(status, payload, info)``."""
        out = {}
        deadline = time.monotonic() + timeout
        for _ in range(n):
            record = self.records.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(record, Exception):
                raise record
            chunk_id, status, payload, info = record
            assert chunk_id not in out
            out[chunk_id] = (status, payload, info)
        return out

    def close(self) -> None:
        self.reader.close()


def start(b: bigpool.B, service: PoolWorkerService) -> bigpool.Machine:
    (m,) = b.start(1, services={SERVICE_NAME: service})
    assert m.wait(State.RUNNING, timeout=60) is State.RUNNING
    assert m.err() is None, m.err()
    return m


@contextlib.contextmanager
def pool(system: str, processes: int = 2, **kw: Any) -> Iterator[tuple[bigpool.Machine, Results]]:
    b = bigpool.start(system)
    try:
        m = start(b, PoolWorkerService(processes, **kw))
        results = Results(m)
        try:
            yield m, results
        finally:
            results.close()
    finally:
        b.shutdown()


def submit(m: bigpool.Machine, *chunks: Chunk) -> None:
    assert m.call(f"{SERVICE_NAME}.submit", list(chunks)) == len(chunks)


def stats(m: bigpool.Machine) -> dict[str, Any]:
    return dict(m.call(f"{SERVICE_NAME}.stats"))


def ok_value(record: tuple[int, Any, dict[str, Any]]) -> Any:
    status, payload, _ = record
    assert status == OK, record
    return dill.loads(payload)



def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- tests --------------------------------------------------------------------------------


def test_submit_stream_queues_records_as_they_arrive() -> None:
    with pool("test", 1) as (m, results):
        first = chunk(1, length, [("hi",)])
        big = Chunk(2, first.func_id, None, pickle.dumps(["x" * 200_000]), False, False)
        records = [bytes(p) for c in (first, big) for p in encode_chunk(c)]
        data = b"".join(records)
        pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]  # records split anywhere
        assert m.call(f"{SERVICE_NAME}.submit_stream", iter(pieces)) == 2
        got = results.get(2)
        assert ok_value(got[1]) == [2]
        assert ok_value(got[2]) == [200_000]  # arrived whole across many pieces


def test_submit_stream_names_a_malformed_or_cut_record() -> None:
    with pool("test", 1) as (m, results):
        whole = b"".join(bytes(p) for p in encode_chunk(chunk(1, square, [(2,)])))
        with pytest.raises(ValueError, match="ended inside a record"):
            m.call(f"{SERVICE_NAME}.submit_stream", iter([whole, whole[:10]]))
        assert ok_value(results.get(1)[1]) == [4]  # the whole record before the cut still ran
        bad = struct.pack(">I", 14) + struct.pack(">BQBI", 0x80, 5, 0, 0)
        with pytest.raises(ValueError, match="unknown flags"):
            m.call(f"{SERVICE_NAME}.submit_stream", iter([bad]))
        submit(m, chunk(6, square, [(5,)], send_func=False))
        assert ok_value(results.get(1)[6]) == [25]  # and the service goes on


def test_records_reach_each_worker_with_the_function_it_lacks_and_only_then() -> None:
    # The machine passes a record on as the driver sent it when it carries exactly what the
    # worker needs, and encodes it again otherwise: with or without the function's pickle.
    with pool("test", 2) as (m, results):
        records = [
            chunk(1, square, [(2,)]),  # to the first idle worker, which lacks it: as sent
            chunk(2, square, [(3,)], send_func=False),  # the second worker lacks it: added
            chunk(3, square, [(4,)]),  # sent again (say the driver forgot): both have it now
            chunk(4, square, [(5,)], send_func=False),
        ]
        data = b"".join(bytes(p) for c in records for p in encode_chunk(c))
        assert m.call(f"{SERVICE_NAME}.submit_stream", iter([data])) == 4
        got = results.get(4)
        assert {i: ok_value(got[i]) for i in got} == {1: [4], 2: [9], 3: [16], 4: [25]}
        assert len({info["pid"] for _, _, info in got.values()}) == 2


@pytest.mark.parametrize("system", ["test", "local"])
def test_chunk_results_star_and_not(system: str) -> None:
    with pool(system) as (m, results):
        submit(
            m,
            chunk(1, square, [(1,), (2,), (3,)]),
            chunk(2, add, [(1, 2), (3, 4)], star=True),
            chunk(3, square, [(4,)], send_func=False),  # the function came with chunk 1
            chunk(4, square, []),
        )
        got = results.get(4)
        assert ok_value(got[1]) == [1, 4, 9]
        assert ok_value(got[2]) == [3, 7]
        assert ok_value(got[3]) == [16]
        assert ok_value(got[4]) == []
        info = stats(m)
        assert {r[2]["pid"] for r in got.values()} <= set(info["worker_pids"])
        assert all(r[2]["seconds"] >= 0 for r in got.values())
        assert info["processes"] == 2 and len(info["worker_pids"]) == 2
        assert info["done"] == 4 and info["queued"] == 0 and info["running"] == 0
        assert info["worker_restarts"] == 0
        assert os.getpid() not in info["worker_pids"]


def test_task_exception_is_task_error_with_traceback() -> None:
    with pool("test", 1) as (m, results):
        submit(m, chunk(1, fail_on_three, [(1,), (3,), (5,)]), chunk(2, fail_on_three, [(4,)]))
        got = results.get(2)
        status, payload, _ = got[1]
        assert status == TASK_ERROR
        exc = decode_error(payload)
        assert type(exc) is ValueError and str(exc) == "three is not allowed (3)"
        assert isinstance(exc.__cause__, RemoteTraceback)
        assert "fail_on_three" in str(exc.__cause__)
        assert ok_value(got[2]) == [4]  # the worker goes on


def test_unpicklable_result_is_encode_error() -> None:
    with pool("test", 1) as (m, results):
        submit(m, chunk(1, make_generator, [(3,)]), chunk(2, square, [(5,)]))
        got = results.get(2)
        status, payload, _ = got[1]
        assert status == ENCODE_ERROR
        exc_repr, value_repr = payload
        assert isinstance(exc_repr, str) and "generator" in exc_repr
        assert "generator object" in value_repr
        err = multiprocessing.pool.MaybeEncodingError(exc_repr, value_repr)
        assert "generator object" in str(err)
        assert ok_value(got[2]) == [25]


def test_bad_function_args_or_id_are_task_errors() -> None:
    with pool("test", 1) as (m, results):
        submit(
            m,
            Chunk(1, b"broken", b"not a pickle", pickle.dumps([(1,)]), False),
            Chunk(2, b"broken", None, pickle.dumps([(1,)]), False),  # same id: same error
            Chunk(3, func_id(square), dill.dumps(square), b"not a pickle either", False),
            Chunk(4, b"never-sent", None, pickle.dumps([(1,)]), False),
        )
        got = results.get(4)
        assert all(r[0] == TASK_ERROR for r in got.values()), got
        assert isinstance(decode_error(got[1][1]), pickle.UnpicklingError)
        assert isinstance(decode_error(got[2][1]), pickle.UnpicklingError)
        assert isinstance(decode_error(got[3][1]), pickle.UnpicklingError)
        assert "never sent" in str(decode_error(got[4][1]))


def test_worker_exit_is_reported_and_worker_replaced() -> None:
    with pool("test", 1) as (m, results):
        submit(m, chunk(1, getpid, [(0,)]))
        first_pid = ok_value(results.get(1)[1])[0]
        submit(m, chunk(2, exit_three, [(0,)]), chunk(3, getpid, [(0,)]))
        got = results.get(2)
        status, death, info = got[2]
        assert status == WORKER_DIED
        assert death["pid"] == first_pid == info["pid"]
        assert death["exitcode"] == 3 and death["signal"] is None and death["oom"] is False
        assert f"worker process {first_pid} exited with code 3" in death["message"]
        assert "about to exit with 3" in death["message"]
        assert any("about to exit with 3" in line for line in death["stderr_tail"])
        new_pid = ok_value(got[3])[0]
        assert new_pid != first_pid
        info = stats(m)
        assert info["worker_pids"] == [new_pid] and info["worker_restarts"] == 1
        assert not alive(first_pid)


def test_sigkill_mid_task_is_reported(tmp_path: Path) -> None:
    with pool("test", 1) as (m, results):
        pidfile = tmp_path / "pid"
        submit(m, chunk(1, pid_then_sleep, [(str(pidfile),)]))
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), 20, "the task to start")
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        status, death, _ = results.get(1)[1]
        assert status == WORKER_DIED
        assert death["pid"] == pid and death["exitcode"] == -signal.SIGKILL
        assert death["signal"] == "SIGKILL"
        assert "killed by signal SIGKILL" in death["message"]
        assert isinstance(death["oom"], bool)
        submit(m, chunk(2, getpid, [(0,)]))
        assert ok_value(results.get(1)[2])[0] != pid


def test_prefetched_chunk_survives_the_death_of_its_worker() -> None:
    with pool("test", 1) as (m, results):
        # Tiny chunks make the worker a prefetch candidate; then a death with one queued behind.
        submit(m, *[chunk(i, noop, [(i,)]) for i in range(20)])
        results.get(20)
        submit(m, chunk(100, exit_three, [(0,)]), chunk(101, square, [(9,)]),
               chunk(102, square, [(10,)]))
        got = results.get(3)
        assert got[100][0] == WORKER_DIED
        assert ok_value(got[101]) == [81] and ok_value(got[102]) == [100]


def test_many_tiny_chunks_all_arrive_in_order_of_work() -> None:
    with pool("test", 2) as (m, results):
        n = 2000
        for start_id in range(0, n, 500):
            submit(m, *[chunk(i, square, [(i,)]) for i in range(start_id, start_id + 500)])
        got = results.get(n, timeout=60)
        assert sorted(got) == list(range(n))
        assert all(ok_value(got[i]) == [i * i] for i in range(n))
        assert stats(m)["done"] == n


def test_initializer_runs_once_per_worker(tmp_path: Path) -> None:
    counter = tmp_path / "inits"
    initializer = dill.dumps((init_worker, (str(counter), "ready")))
    with pool("test", 2, initializer=initializer) as (m, results):
        submit(m, *[chunk(i, read_initialized, [(0,), (1,)]) for i in range(6)])
        got = results.get(6)
        assert all(ok_value(r) == ["ready", "ready"] for r in got.values())
        lines = counter.read_text().split()
        assert len(lines) == 2
        assert sorted(int(p) for p in lines) == sorted(stats(m)["worker_pids"])


def test_initializer_failure_fails_the_start() -> None:
    with bigpool.start("test") as b:
        service = PoolWorkerService(2, initializer=dill.dumps((failing_initializer, ())))
        (m,) = b.start(1, services={SERVICE_NAME: service})
        m.wait(State.RUNNING, timeout=60)
        err = m.err()
        assert isinstance(err, ServiceStartError), err
        assert "initializer failed" in str(err) and "initializer-boom" in str(err)


def test_maxtasksperchild_replaces_workers(tmp_path: Path) -> None:
    counter = tmp_path / "inits"
    initializer = dill.dumps((init_worker, (str(counter), "x")))
    with pool("test", 1, maxtasksperchild=2, initializer=initializer) as (m, results):
        pids = []
        for i in range(6):  # one task per chunk: a new worker every 2 chunks
            submit(m, chunk(i, getpid, [(i,)]))
            pids.append(ok_value(results.get(1)[i])[0])
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
        assert len({pids[0], pids[2], pids[4]}) == 3
        submit(m, chunk(10, getpid, [(0,), (1,), (2,)]))  # tasks, not chunks, are counted
        three = ok_value(results.get(1)[10])
        assert len(set(three)) == 1 and three[0] not in pids
        submit(m, chunk(11, getpid, [(0,)]))
        assert ok_value(results.get(1)[11])[0] != three[0]
        # Each replacement ran the initializer once.
        wait_until(lambda: len(counter.read_text().split()) == 5, 10, "5 initializer runs")
        assert stats(m)["worker_restarts"] >= 4
        for pid in [*pids, three[0]]:
            wait_until(lambda pid=pid: not alive(pid), 10, f"retired worker {pid} to exit")


def test_cancel_drops_queued_chunks(tmp_path: Path) -> None:
    with pool("test", 1) as (m, results):
        gate = tmp_path / "gate"
        submit(m, chunk(1, wait_for_file, [(str(gate),)]),
               *[chunk(i, square, [(i,)]) for i in range(2, 6)])
        info = stats(m)
        assert info["running"] == 1 and info["queued"] == 4
        dropped = m.call(f"{SERVICE_NAME}.cancel", [3, 5, 1, 99])
        assert sorted(dropped) == [3, 5]  # 1 is running, 99 unknown
        assert stats(m)["queued"] == 2
        gate.touch()
        got = results.get(3)
        assert sorted(got) == [1, 2, 4]
        assert ok_value(got[4]) == [16]
        with pytest.raises(queue.Empty):
            results.get(1, timeout=0.5)


def test_two_workers_run_two_chunks_in_parallel(tmp_path: Path) -> None:
    with pool("test", 2) as (m, results):
        # Warm both workers with tiny chunks (which also makes them prefetch candidates).
        submit(m, *[chunk(i, noop, [(i,)]) for i in range(10)])
        results.get(10)
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        submit(m, chunk(20, rendezvous, [(a, b)], star=True),
               chunk(21, rendezvous, [(b, a)], star=True))
        got = results.get(2)
        assert ok_value(got[20]) == [True] and ok_value(got[21]) == [True]
        assert got[20][2]["pid"] != got[21][2]["pid"]


def test_task_print_reaches_driver_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    with pool("local", 1) as (m, results):
        submit(m, chunk(1, say, [("hello-from-task-1",), ("hello-from-task-2",)]))
        assert ok_value(results.get(1)[1]) == ["hello-from-task-1", "hello-from-task-2"]
        seen = ""

        def printed() -> bool:
            nonlocal seen
            seen += capfd.readouterr().out
            return f"{m.addr}: hello-from-task-2\n" in seen

        wait_until(printed, 10, "the task's output")
        assert f"{m.addr}: hello-from-task-1\n" in seen


@pytest.mark.parametrize("system", ["test", "local"])
def test_shutdown_workers_leaves_no_worker_and_ends_stream(system: str, tmp_path: Path) -> None:
    with pool(system, 2) as (m, results):
        pidfile = tmp_path / "pid"
        submit(m, chunk(1, pid_then_sleep, [(str(pidfile),)]))  # one busy, one idle
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), 20, "the task to start")
        pids = stats(m)["worker_pids"]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        m.call(f"{SERVICE_NAME}.shutdown_workers", timeout=30)
        assert not any(alive(p) for p in pids)
        assert results.ended.wait(10), "the results stream did not end"
        assert results.records.empty()  # a chunk stopped by shutdown is not reported
        with pytest.raises(RuntimeError, match="shut down"):
            submit(m, chunk(2, square, [(1,)]))


@pytest.mark.parametrize("system", ["test", "local"])
def test_machine_shutdown_leaves_no_worker(system: str) -> None:
    b = bigpool.start(system)
    try:
        m = start(b, PoolWorkerService(2))
        pids = stats(m)["worker_pids"]
        assert all(alive(p) for p in pids)
    finally:
        b.shutdown()
    wait_until(lambda: not any(alive(p) for p in pids), 10, "workers to exit with the machine")


def test_replacement_initializer_failure_fails_its_chunk(tmp_path: Path) -> None:
    flag = tmp_path / "refuse"
    initializer = dill.dumps((init_unless_file, (str(flag),)))
    with pool("test", 1, initializer=initializer) as (m, results):
        flag.touch()  # the first worker started fine; its replacement will not
        submit(m, chunk(1, exit_three, [(0,)]), chunk(2, square, [(3,)]))
        got = results.get(2)
        assert got[1][0] == WORKER_DIED
        status, payload, _ = got[2]
        assert status == TASK_ERROR
        exc = decode_error(payload)
        assert type(exc) is RuntimeError and "initializer refused" in str(exc)
        flag.unlink()  # the next replacement's initializer succeeds
        submit(m, chunk(3, square, [(4,)]))
        assert ok_value(results.get(1)[3]) == [16]


# --- worker channels on either event loop ---------------------------------------------------


def _loop_factories() -> Iterator[Any]:
    yield pytest.param(asyncio.new_event_loop, id="asyncio")
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        yield pytest.param(uvloop.new_event_loop, id="uvloop")
    else:
        yield pytest.param(None, id="uvloop", marks=pytest.mark.skip(reason="no uvloop"))


def _open_socket_inodes() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own descriptor, gone by now
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("factory", list(_loop_factories()))
def test_worker_channels_are_closed_once_however_a_spawn_ends(
    monkeypatch: pytest.MonkeyPatch, factory: Any
) -> None:
    """A worker's channels, whether its spawn completes or is cancelled while they are being
    handed to the loop, end closed (nothing of them left open) and with no socket object still
    holding a number it could close a second time. uvloop closes a pipe's descriptor and then
    its file object again; the channels are socket pairs for that reason."""
    made: list[socket.socket] = []
    names: dict[int, str] = {}

    def socketpair() -> tuple[socket.socket, socket.socket]:
        pair = socket.socketpair()
        for end in pair:
            made.append(end)
            names[id(end)] = f"socket:[{os.fstat(end.fileno()).st_ino}]"
        return pair

    monkeypatch.setattr(bigpool.worker, "socket", types.SimpleNamespace(socketpair=socketpair))
    stages: list[tuple[int, int]] = []
    settle = bigpool.worker._Worker.settle_failed_connect

    def record(w: bigpool.worker._Worker) -> None:
        stages.append((w.handed, w.connected))
        settle(w)

    monkeypatch.setattr(bigpool.worker._Worker, "settle_failed_connect", record)
    children_before = {p.pid for p in psutil.Process().children()}
    completed = 0

    async def spawn_and_cancel(steps: int) -> None:
        nonlocal completed
        service = bigpool.worker.PoolWorkerService(1)
        service._loop = asyncio.get_running_loop()
        service._wake = asyncio.Event()
        service._env = bigpool.worker._worker_env()
        first = len(made)
        task = asyncio.ensure_future(service._spawn(replacement=False))
        try:
            for _ in range(steps):  # let the spawn run this many loop passes, then cancel it
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                completed += 1
        finally:
            # As the service's init does when a spawn fails: no replacement may start after.
            await service.shutdown_workers()
            while service._tasks:  # a reaper started when a connected channel was closed
                await asyncio.gather(*service._tasks, return_exceptions=True)
        mine = made[first:]
        assert len(mine) in (0, 8)  # one spawn, four pairs (or cancelled before it began)
        deadline = asyncio.get_running_loop().time() + 10
        # Transports close their channels a loop pass or two after being closed.
        while any(end.fileno() != -1 for end in mine):
            assert asyncio.get_running_loop().time() < deadline, mine
            await asyncio.sleep(0.01)

    loop = factory()
    try:
        for steps in range(16):
            loop.run_until_complete(spawn_and_cancel(steps))
    finally:
        loop.close()
        for child in psutil.Process().children():  # only if the test failed half way
            if child.pid not in children_before:
                with contextlib.suppress(psutil.Error):
                    child.kill()
                    child.wait(10)
    gc.collect()  # an unclosed socket or transport would warn (an error here) now
    assert made and all(end.fileno() == -1 for end in made)
    assert not {names[id(end)] for end in made} & _open_socket_inodes()
    assert {p.pid for p in psutil.Process().children()} <= children_before
    # Every hand-over was interrupted at least once, and some spawns completed.
    assert {handed for handed, connected in stages if connected < handed} == {1, 2, 3, 4}, stages
    assert completed


# --- revoking chunks sent ahead to a worker -----------------------------------------------


class WorkerProcess:
    """A ``bigpool._worker_main`` process driven by hand over its three channels."""

    def __init__(self) -> None:
        from bigpool._worker_main import ENV_FDS

        self.cmd, cmd_child = socket.socketpair()
        self.res, res_child = socket.socketpair()
        self.rev, rev_child = socket.socketpair()
        env = bigpool.worker._worker_env()
        env[ENV_FDS] = f"{cmd_child.fileno()},{res_child.fileno()},{rev_child.fileno()}"
        fds = (cmd_child.fileno(), res_child.fileno(), rev_child.fileno())
        self.proc = subprocess.Popen([sys.executable, "-m", "bigpool._worker_main"],
                                     pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        for end in (cmd_child, res_child, rev_child):
            end.close()
        self.frames = self.res.makefile("rb")
        init = pickle.dumps(("init", None))
        self.cmd.sendall(struct.pack(">I", len(init)) + init)
        kind, _ = self.frame()
        assert kind == bigpool._worker_main.MSG_READY

    def send(self, c: Chunk, include_function: bool = True) -> None:
        for part in encode_chunk(c, include_function):
            self.cmd.sendall(part)

    def revoke(self, *seqs: int) -> None:
        self.rev.sendall(struct.pack(">I", 8 * len(seqs)) + b"".join(struct.pack(">Q", s)
                                                                     for s in seqs))

    def frame(self) -> tuple[int, bytes]:
        """The next frame but expvars: (kind, body)."""
        while True:
            size, kind, _ = struct.unpack(">IBI", self.frames.read(9))
            body = self.frames.read(size)
            if kind != bigpool._worker_main.MSG_EXPVARS:
                return kind, body

    def close(self) -> None:
        for end in (self.cmd, self.rev):
            end.close()
        try:
            self.proc.wait(10)
        finally:
            self.proc.kill()
            self.proc.wait()
            self.frames.close()
            self.res.close()


@pytest.fixture
def worker_process() -> Iterator[WorkerProcess]:
    w = WorkerProcess()
    try:
        yield w
    finally:
        w.close()


def result_of(body: bytes) -> Any:
    (result,) = ResultDecoder().feed(body)
    return result


def test_a_worker_skips_exactly_the_chunks_it_revoked(
        worker_process: WorkerProcess, tmp_path: Path) -> None:
    w = worker_process
    gate = tmp_path / "gate"
    from bigpool._worker_main import MSG_RESULT, MSG_REVOKED

    begun = tmp_path / "begun"
    w.send(chunk(1, rendezvous, [(str(begun), str(gate))], star=True))  # seq 0: waits for gate
    w.send(chunk(2, square, [(2,)]))  # seq 1: brings square's function, then is revoked
    w.send(chunk(3, square, [(3,)], send_func=False))  # seq 2: uses the function seq 1 brought
    w.send(chunk(4, square, [(4,)], send_func=False))  # seq 3
    wait_until(begun.exists, 10, "seq 0 to begin")
    w.revoke(0, 1, 3, 7)  # 0 has begun; 7 was never sent (revoked before it comes)
    kind, body = w.frame()  # answered while seq 0 still runs
    assert kind == MSG_REVOKED
    assert sorted(struct.unpack(f">{len(body) // 8}Q", body)) == [1, 3, 7]
    gate.touch()
    got = [w.frame() for _ in range(2)]
    assert [kind for kind, _ in got] == [MSG_RESULT, MSG_RESULT]
    results = [result_of(body) for _, body in got]
    assert [r.chunk_id for r in results] == [1, 3]
    assert results[1].status == OK and dill.loads(bytes(results[1].payload)) == [9]
    w.send(chunk(5, square, [(5,)], send_func=False))  # seq 4
    w.send(chunk(6, square, [(6,)], send_func=False))  # seq 5
    w.send(chunk(7, square, [(7,)], send_func=False))  # seq 6
    w.send(chunk(8, square, [(8,)], send_func=False))  # seq 7: revoked ahead of time
    w.send(chunk(9, square, [(9,)], send_func=False))  # seq 8
    assert [result_of(w.frame()[1]).chunk_id for _ in range(4)] == [5, 6, 7, 9]


def quick_rendezvous(i: int, tmp_path: Path) -> Chunk:
    (tmp_path / "open").touch()
    return chunk(i, rendezvous, [(str(tmp_path / "mine"), str(tmp_path / "open"))], star=True)


def warm(m: bigpool.Machine, results: Results, ids: range, tmp_path: Path) -> None:
    """Run quick chunks of rendezvous, so the machine sends its next ones ahead."""
    submit(m, *[quick_rendezvous(i, tmp_path) for i in ids])
    results.get(len(ids))


def test_cancel_takes_back_chunks_sent_ahead_to_a_busy_worker(tmp_path: Path) -> None:
    with pool("test", 1) as (m, results):
        warm(m, results, range(100, 140), tmp_path)
        gate = tmp_path / "gate"
        quick = [quick_rendezvous(i, tmp_path) for i in range(2, 8)]
        begun = tmp_path / "begun"
        submit(m, chunk(1, rendezvous, [(str(begun), str(gate))], star=True), *quick)
        wait_until(begun.exists, 10, "chunk 1 to begin")
        info = stats(m)
        assert info["running"] > 1, info  # some were sent ahead, behind the one that waits
        dropped = m.call(f"{SERVICE_NAME}.cancel", list(range(1, 8)))
        assert sorted(dropped) == list(range(2, 8))  # all but the one begun
        assert stats(m)["running"] == 1 and stats(m)["queued"] == 0
        gate.touch()
        assert sorted(results.get(1)) == [1]
        with pytest.raises(queue.Empty):
            results.get(1, timeout=0.5)  # none of the revoked ones ran
        submit(m, chunk(9, rendezvous, [(str(begun), str(gate))], star=True, send_func=False))
        assert ok_value(results.get(1)[9]) == [True]
        assert stats(m)["worker_restarts"] == 0


def test_a_revocation_answered_too_late_queues_its_chunks_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker answers only when its task lets go of the GIL: here one C call holds it for
    # long past the machine's wait. What the worker then revokes runs on the machine after
    # all; nothing is lost or run twice.
    monkeypatch.setattr(bigpool.worker, "REVOKE_TIMEOUT", 0.05)
    with pool("test", 1) as (m, results):
        mark = str(tmp_path / "mark")
        submit(m, *[chunk(i, announce_then_sum, [(mark, 10)], star=True) for i in range(100, 140)])
        results.get(40)
        begun = tmp_path / "begun"
        quick = [chunk(i, announce_then_sum, [(mark, i)], star=True) for i in range(2, 8)]
        submit(m, chunk(1, announce_then_sum, [(str(begun), 10**8)], star=True), *quick)
        wait_until(begun.exists, 10, "chunk 1 to begin")
        info = stats(m)
        assert info["running"] > 1, info  # chunk 1 and some sent ahead behind it
        dropped = m.call(f"{SERVICE_NAME}.cancel", list(range(1, 8)))
        assert len(dropped) == info["queued"]  # only those still queued on the machine
        left = sorted(set(range(1, 8)) - set(dropped))
        got = results.get(len(left))
        assert sorted(got) == left
        assert [ok_value(got[i]) for i in left[1:]] == [[sum(range(i))] for i in left[1:]]
        with pytest.raises(queue.Empty):
            results.get(1, timeout=0.5)
