"""Machines on the test and local systems: boot, calls, failures, keepalive, output, bundles."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import operator
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from loop_support import expected_loop_name
from pool_support import wait_until

import bigpool
from bigpool import CallTimeoutError, KeepaliveConfig, NetworkError, State
from bigpool.h2rpc import Authority, Client, SyncStreamReader
from bigpool.machine import MachineStoppedError, ServiceStartError
from bigpool.systems.local import LocalSystem
from bigpool.systems.test import TestSystem


class Service:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def echo(self, x: Any) -> Any:
        return x

    def getenv(self, key: str) -> str | None:
        return os.environ.get(key)

    def pid(self) -> int:
        return os.getpid()

    def spin_for(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
        return n

    def chatter(self, n: int) -> None:
        for i in range(n):
            print(f"line {i}")

    def say(self, text: str) -> None:
        print(text, flush=True)
        print("to stderr: " + text, file=sys.stderr, flush=True)

    async def hang(self, _: Any) -> None:
        await asyncio.Event().wait()

    def block_until_cancelled(self, limit: float) -> bool:
        call = bigpool.h2rpc.current_call()
        return call.cancelled.wait(limit)

    def blob(self, size: int) -> Iterator[bytes]:
        chunk = bytes(range(256)) * 4096  # 1 MiB
        sent = 0
        while sent < size:
            part = chunk[: min(len(chunk), size - sent)]
            sent += len(part)
            yield part

    def relay(self, target: tuple[str, Any]) -> Any:
        addr, value = target
        other = self._b.dial(addr)
        return other.call("S.echo", value, timeout=30), os.getpid()

    def init(self, b: bigpool.B) -> None:
        self._b = b


class FailingInit:
    def ping(self) -> str:
        return "pong"

    def init(self, b: bigpool.B) -> None:
        raise RuntimeError("init refused to start")


class Unloadable:
    """Pickles fine; fails when the machine unpickles it (1 / 0 runs at load)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (operator.truediv, (1, 0))


def booted(b: bigpool.B, n: int, services: dict[str, object] | None = None, **kw: Any) -> list[bigpool.Machine]:
    machines = b.start(n, services=services or {"S": Service()}, **kw)
    for m in machines:
        assert m.wait(State.RUNNING, timeout=60) is State.RUNNING, m.err()
    return machines


@pytest.fixture(params=["test", "local"])
def cluster(request: pytest.FixtureRequest) -> Iterator[bigpool.B]:
    b = bigpool.start(request.param)
    try:
        yield b
    finally:
        b.shutdown()


def test_boot_to_running_and_call(cluster: bigpool.B) -> None:
    machines = booted(cluster, 2)
    assert [m.state for m in machines] == [State.RUNNING, State.RUNNING]
    assert all(m.err() is None and m.owned for m in machines)
    assert [m.call("S.echo", i) for i, m in enumerate(machines)] == [0, 1]
    assert len(cluster.machines()) == 2
    assert machines[0].keepalive_reply_times(), "the boot keepalive was not recorded"
    assert machines[0].hostname == "127.0.0.1"
    assert machines[0].load_info()["cpus"] >= 1
    assert machines[0].mem_info()["total"] > 0
    assert machines[0].disk_info()["total"] > 0


async def test_call_async_from_another_loop(cluster: bigpool.B) -> None:
    (m,) = await asyncio.to_thread(booted, cluster, 1)
    assert await m.call_async("S.echo", "hi") == "hi"


def test_call_timeout_raises_call_timeout_error(cluster: bigpool.B) -> None:
    (m,) = booted(cluster, 1)
    started = time.monotonic()
    with pytest.raises(CallTimeoutError) as info:
        m.call("S.hang", None, timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 5
    # The remote side learns of it: a thread-run method sees its call cancelled.
    assert m.call("S.echo", 1) == 1


def test_thread_method_sees_caller_timeout(cluster: bigpool.B) -> None:
    (m,) = booted(cluster, 1)
    with pytest.raises(CallTimeoutError):
        m.call("S.block_until_cancelled", 30.0, timeout=0.3)


async def test_cancelled_call_raises_cancelled_error(cluster: bigpool.B) -> None:
    (m,) = await asyncio.to_thread(booted, cluster, 1)
    task = asyncio.ensure_future(m.call_async("S.hang", None))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await m.call_async("S.echo", 2) == 2


def test_machine_cancel_fails_pending_calls(cluster: bigpool.B) -> None:
    (m,) = booted(cluster, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(m.call, "S.hang", None)
        time.sleep(0.2)
        m.cancel()
        with pytest.raises(MachineStoppedError) as info:
            pending.result(timeout=10)
    assert isinstance(info.value.__cause__, concurrent.futures.CancelledError)
    assert m.state is State.STOPPED
    with pytest.raises(MachineStoppedError):
        m.call("S.echo", 1)


@pytest.mark.parametrize("service,expected", [(FailingInit(), RuntimeError),
                                              (Unloadable(), ZeroDivisionError)])
def test_service_failure_stops_machine_quickly(cluster: bigpool.B, service: object,
                                               expected: type[BaseException]) -> None:
    started = time.monotonic()
    (m,) = cluster.start(1, services={"Bad": service})
    assert m.wait(State.RUNNING, timeout=30) is State.STOPPED
    assert time.monotonic() - started < 5
    err = m.err()
    assert isinstance(err, ServiceStartError) and "'Bad'" in str(err)
    # The machine's own error is the cause; what it wraps is named in its message.
    assert isinstance(err.__cause__, expected) or expected.__name__ in str(err.__cause__)
    assert expected.__name__ in str(err)


def test_streamed_reply_arrives_whole(cluster: bigpool.B) -> None:
    (m,) = booted(cluster, 1)
    size = 32 * 1024 * 1024
    reader = m.call("S.blob", size)
    assert isinstance(reader, SyncStreamReader)
    digest = hashlib.sha256()
    total = 0
    for chunk in reader.iter_chunks():
        digest.update(chunk)
        total += len(chunk)
    expected = hashlib.sha256(b"".join(Service().blob(size))).hexdigest()
    assert total == size and digest.hexdigest() == expected
    started = time.monotonic()
    assert m.call("S.blob", 0).read() == b""
    assert time.monotonic() - started < 2


def test_machine_to_machine_call(cluster: bigpool.B) -> None:
    a, c = booted(cluster, 2)
    value, relay_pid = a.call("S.relay", (c.addr, {"x": 1}), timeout=60)
    assert value == {"x": 1}
    assert relay_pid == a.call("S.pid")  # the dial and call were made on machine a


def test_killed_test_machine_fails_calls_with_network_error() -> None:
    system = TestSystem(keepalive=KeepaliveConfig(period=0.1, timeout=1.0, rpc_timeout=0.3))
    with bigpool.start(system) as b:
        m, other = booted(b, 2)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(m.call, "S.hang", None)
            time.sleep(0.1)
            system.kill(m)
            with pytest.raises(NetworkError):
                pending.result(timeout=10)
        wait_until(lambda: m.state is State.STOPPED, 10, "the killed machine to stop")
        assert isinstance(m.err(), NetworkError) and m.err().temporary
        with pytest.raises(MachineStoppedError):
            m.call("S.echo", 1)
        assert other.call("S.echo", 5) == 5


def test_killed_local_machine_reports_signal() -> None:
    system = LocalSystem(keepalive=KeepaliveConfig(period=0.2, timeout=2.0, rpc_timeout=0.5))
    with bigpool.start(system) as b:
        (m,) = booted(b, 1)
        system.kill(m, signal.SIGKILL)
        wait_until(lambda: m.state is State.STOPPED, 10, "the killed machine to stop")
        assert "SIGKILL" in str(m.err())
        with pytest.raises(MachineStoppedError):
            m.call("S.echo", 1)


def test_environ_reaches_local_machine_exactly() -> None:
    with bigpool.start("local") as b:
        (m,) = booted(b, 1, environ=["BIGPOOL_T1=one", "BIGPOOL_T2=a=b c", "BIGPOOL_T1=two"])
        assert m.call("S.getenv", "BIGPOOL_T1") == "two"
        assert m.call("S.getenv", "BIGPOOL_T2") == "a=b c"
        assert m.call("S.getenv", "BIGPOOL_UNSET") is None


def test_bad_start_arguments_are_named() -> None:
    with bigpool.start("test") as b:
        with pytest.raises(ValueError, match="positive integer"):
            b.start(0, services={"S": Service()})
        with pytest.raises(ValueError, match="at least one service"):
            b.start(1, services={})
        with pytest.raises(ValueError, match="KEY=VALUE"):
            b.start(1, services={"S": Service()}, environ=["nokey"])
        with pytest.raises(TypeError, match="cannot be pickled"):
            b.start(1, services={"S": (x for x in range(3))})
    with pytest.raises(ValueError, match="unknown system 'nope'"):
        bigpool.start("nope")


def test_machine_output_reaches_driver_prefixed(capfd: pytest.CaptureFixture[str]) -> None:
    with bigpool.start("local") as b:
        (m,) = booted(b, 1)
        m.call("S.say", "hello-from-machine")
    out, err = capfd.readouterr()
    assert f"{m.addr}: hello-from-machine\n" in out
    assert f"{m.addr}: to stderr: hello-from-machine\n" in err


def test_no_output_is_lost_at_shutdown(capfd: pytest.CaptureFixture[str]) -> None:
    b = bigpool.start("local")
    try:
        (m,) = booted(b, 1)
        m.call("S.chatter", 5000)
    finally:
        b.shutdown()
    out, _ = capfd.readouterr()
    lines = [line for line in out.splitlines() if line.startswith(f"{m.addr}: line ")]
    assert lines == [f"{m.addr}: line {i}" for i in range(5000)]


def test_client_from_another_ca_is_refused() -> None:
    with bigpool.start("local") as b:
        (m,) = booted(b, 1)
        stranger = Client(Authority.create().issue("stranger").client_context())

        async def attempt() -> Any:
            try:
                return await stranger.call(m.addr, "S.echo", 1, timeout=10)
            finally:
                await stranger.close()

        with pytest.raises(NetworkError):
            asyncio.run(attempt())
        assert m.call("S.echo", 3) == 3


DRIVER_SCRIPT = textwrap.dedent("""
    import sys, time, bigpool
    from bigpool.systems.local import LocalSystem
    class S:
        def ping(self): return "pong"
    system = LocalSystem(keepalive=bigpool.KeepaliveConfig(period=0.3, timeout=2.0, rpc_timeout=0.5))
    b = bigpool.start(system)
    ms = b.start(2, services={"S": S()})
    for m in ms:
        m.wait(bigpool.State.RUNNING, timeout=60)
        assert m.err() is None, m.err()
    print(" ".join(str(m.pid) for m in ms), flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkilled_driver_leaves_no_machine_behind() -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER_SCRIPT], stdout=subprocess.PIPE,
                              text=True)
    pids: list[int] = []
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids), line
        driver.kill()
        driver.wait(10)
        killed_at = time.monotonic()
        wait_until(lambda: not any(_alive(p) for p in pids), 15, "machines to exit")
        # The watchdog fires after the keepalive timeout (2 s), not at once and not much later.
        assert time.monotonic() - killed_at < 10
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_bundle_upload_exec_and_digest(tmp_path: Any) -> None:
    from bigpool.bundle import current_bundle

    system = LocalSystem(exec_bundle=True, bundle_dir=str(tmp_path / "store"))
    with bigpool.start(system) as b:
        (m,) = booted(b, 1)
        info = m.call("Supervisor.info")
        assert info["digest"] == current_bundle().digest
        assert b.bundle_uploads == 1
        first_pid = m.call("S.pid")
        assert first_pid == info["pid"]
        from bigpool.bundle import deserialize_bundle

        stored = m.call("Supervisor.getbinary").read()
        assert deserialize_bundle(stored).digest == info["digest"]
        (m2,) = booted(b, 1)
        assert b.bundle_uploads == 1, "the second start uploaded the bundle again"
        assert m2.call("Supervisor.info")["digest"] == current_bundle().digest
        assert m2.call("S.echo", "ok") == "ok"


def test_supervisor_reports_and_profiles() -> None:
    with bigpool.start("local") as b:
        (m,) = booted(b, 1)
        assert m.call("Supervisor.ping", 41) == 41
        assert m.call("Supervisor.getpid") == m.pid
        info = m.call("Supervisor.info")
        assert info["python"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}")
        assert info["event_loop"] == expected_loop_name()
        assert "threads" in m.call("Supervisor.profiles")
        dump = m.call("Supervisor.profile", "threads", timeout=60)
        assert "MainThread" in dump and str(m.pid) in dump
        expvars = m.call("Supervisor.expvars")
        assert expvars["services"] == ["S", "Supervisor"] and expvars["uptime_seconds"] > 0
        with pytest.raises(ValueError, match="unknown profile"):
            m.call("Supervisor.profile", "nope")


def test_cpu_profile_names_the_busy_function() -> None:
    with bigpool.start("local") as b:
        (m,) = booted(b, 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(m.call, "S.spin_for", 4.0, timeout=60)
            profile = m.call("Supervisor.cpu_profile", 1, timeout=60).read().decode()
            assert busy.result(timeout=60) > 0
        assert "spin_for" in profile, profile[:2000]
