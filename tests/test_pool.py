"""BigPool beyond the stdlib's semantics: machine loss, retries, diagnostics, laziness."""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pool_support import wait_until

from bigpool import BigPool, KeepaliveConfig, PoolTerminatedError, State, TaskLostError
from bigpool.pool import (
    IMAP_WINDOW_PER_SLOT,
    OUT_OF_BAND_FROM,
    REPICKLE_FROM,
    _Latch,
    _pickle_tasks,
    _plain,
)
from bigpool.pool_wire import MACHINE_FUNCTIONS
from bigpool.systems.local import LocalSystem
from bigpool.systems.test import TestSystem
from bigpool.worker import SERVICE_NAME


def slow_square(x: int) -> int:
    time.sleep(0.001)
    return x * x


def exit_three(x: int) -> int:
    os._exit(3)


def sleep_then(x: float) -> float:
    time.sleep(x)
    return x


def pid_of(_: object) -> int:
    return os.getpid()


FAST_KEEPALIVE = KeepaliveConfig(period=0.2, timeout=1.5, rpc_timeout=0.5)


def test_machine_killed_mid_map_gives_every_result_exactly_once() -> None:
    system = TestSystem(keepalive=FAST_KEEPALIVE)
    with BigPool(3, system=system) as pool:
        victim = pool.machines[0]
        results: list[int] = []
        killed = False
        for value in pool.imap_unordered(slow_square, range(10_000), chunksize=10):
            results.append(value)
            if len(results) == 2_000 and not killed:
                system.kill(victim)
                killed = True
        assert killed
        assert sorted(results) == [x * x for x in range(10_000)]
        wait_until(lambda: victim.state is State.STOPPED, 10, "the killed machine to stop")
        # The pool goes on with the others.
        assert pool.map(slow_square, range(50)) == [x * x for x in range(50)]


def test_retries_zero_names_the_lost_machine() -> None:
    system = LocalSystem(keepalive=FAST_KEEPALIVE)
    with BigPool(2, system=system, retries=0) as pool:
        result = pool.apply_async(sleep_then, (30,))
        # Find the machine that runs it, then kill it.
        wait_until(lambda: any(f.in_flight for f in pool._scheduler.feeds), 10, "dispatch")
        feed = next(f for f in pool._scheduler.feeds if f.in_flight)
        system.kill(feed.machine, signal.SIGKILL)
        with pytest.raises(TaskLostError) as info:
            result.get(timeout=30)
        message = str(info.value)
        assert feed.machine.addr in message and "SIGKILL" in message
        assert info.value.machine == feed.machine.addr
        assert pool.apply(slow_square, (4,)) == 16


def test_worker_exit_code_is_reported() -> None:
    with BigPool(1, system="local", retries=0) as pool:
        with pytest.raises(TaskLostError) as info:
            pool.apply(exit_three, (1,))
        assert info.value.exitcode == 3 and "code 3" in str(info.value)
        # The slot was replaced: the pool still works.
        assert pool.apply(slow_square, (3,)) == 9


def test_terminate_with_many_tasks_pending_returns_promptly() -> None:
    pool = BigPool(2, system="test")
    try:
        result = pool.map_async(sleep_then, [0.01] * 10_000, chunksize=1)
        started = time.monotonic()
        pool.terminate()
        assert time.monotonic() - started < 10
        with pytest.raises(PoolTerminatedError):
            result.get(timeout=5)
    finally:
        pool.terminate()


def test_imap_reads_an_endless_input_a_bounded_window_ahead() -> None:
    pulled = itertools.count()
    seen = [0]
    lock = threading.Lock()

    def endless() -> Iterator[int]:
        for i in pulled:
            with lock:
                seen[0] = i + 1
            yield i

    with BigPool(1, system="test") as pool:
        it = pool.imap(slow_square, endless())
        first = [next(it) for _ in range(10)]
        assert first == [x * x for x in range(10)]
        window = IMAP_WINDOW_PER_SLOT * 1
        wait_until(lambda: seen[0] >= 10 + window, 20, "the feeder to fill its window")
        assert seen[0] <= 10 + window + 1, seen[0]


def test_services_are_installed_beside_the_pool() -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, k: int) -> int:
            self.n += k
            return self.n

    with BigPool(2, system="test", services={"Counter": Counter()}) as pool:
        assert len(pool.machines) == 2
        for machine in pool.machines:
            assert machine.call("Counter.add", 2) == 2
            assert machine.call("Counter.add", 3) == 5


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BigPool(0, system="test")
    with pytest.raises(TypeError, match="processes must be an integer"):
        BigPool("2", system="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown system 'nowhere'"):
        BigPool(1, system="nowhere")
    with pytest.raises(ValueError, match="retries"):
        BigPool(1, system="test", retries=-1)


def _adder(n: int) -> Callable[[int], int]:
    return lambda x: x + n  # a new closure each time: a new function to every table


def test_ever_new_functions_are_held_in_bounded_tables_and_resent_when_forgotten() -> None:
    count = MACHINE_FUNCTIONS + 100  # more than every table holds: driver, machine, worker
    functions = [_adder(n) for n in range(count)]
    with BigPool(processes=1, system="local") as pool:
        assert [pool.apply(f, (1000,)) for f in functions] == [1000 + n for n in range(count)]
        (machine,) = pool.machines
        held = machine.call(f"{SERVICE_NAME}.stats")["functions"]
        assert 0 < held <= MACHINE_FUNCTIONS
        # The first functions were forgotten everywhere since; they are sent again and run.
        assert [pool.apply(f, (1,)) for f in functions[:3]] == [1, 2, 3]
        assert pool.map(functions[0], range(5), chunksize=1) == [0, 1, 2, 3, 4]


def digest_of(data: bytes | str) -> str:
    time.sleep(0.02)  # long enough that a killed machine is holding some of them
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@pytest.mark.parametrize("kind", ["bytes", "str"])
def test_large_arguments_are_sent_again_on_retry(kind: str) -> None:
    # Each argument is larger than REPICKLE_FROM. A str is pickled when the chunk is made
    # (errors are the caller's at once) and again when sent, once more if its machine is lost;
    # bytes travel out of band, as the very objects, each time.
    size = REPICKLE_FROM + 1000
    blobs: list[Any] = [(chr(65 + i) * size if kind == "str" else bytes([i]) * size)
                        for i in range(24)]
    system = TestSystem(keepalive=FAST_KEEPALIVE)
    with BigPool(3, system=system) as pool:
        victim = pool.machines[0]
        results: list[tuple[int, str]] = []
        for i, digest in enumerate(pool.imap(digest_of, blobs, chunksize=1)):
            results.append((i, digest))
            if i == 3:
                system.kill(victim)
        assert results == [(i, digest_of(b)) for i, b in enumerate(blobs)]
        assert pool._scheduler.tasks_retried > 0  # the victim held some: they were re-sent
        assert pool.map(len, blobs[:4]) == [size] * 4


def describe(*args: Any) -> list[Any]:
    """What a task got: each argument's type, length and digest, and which are one object."""
    return [[type(a).__name__, len(a), hashlib.sha256(a).hexdigest()[:12]] for a in args] + [
        [i for i, a in enumerate(args) if a is args[0]]]


def describe_then_call(data: bytes, fn: Callable[[], Any]) -> list[Any]:
    return [describe(data), fn()]


class Tagged(bytes):
    pass


def test_large_bytes_arguments_arrive_whole_with_their_types() -> None:
    big = os.urandom(OUT_OF_BAND_FROM + 1)
    other = os.urandom(OUT_OF_BAND_FROM * 3)
    cases = [(big, b"small", big), (other, bytearray(other), Tagged(big)), (b"", big, b"x")]
    expected = [describe(*case) for case in cases]
    with BigPool(2, system="local") as pool:
        assert pool.starmap(describe, cases, chunksize=1) == expected
        assert pool.starmap(describe, cases, chunksize=3) == expected
        assert pool.map(len, [big, other, b"tiny"] * 3, chunksize=2) == [len(big), len(other),
                                                                         4] * 3
        # With a lambda beside it the arguments go through dill's pickler: still out of band.
        assert pool.apply(describe_then_call, (big, lambda: 7)) == [describe(big), 7]


def test_large_bytes_arguments_are_not_copied_into_the_pickle() -> None:
    big = bytes(OUT_OF_BAND_FROM)
    data, by_value, buffers = _pickle_tasks([(big, 1, big), (b"small", 2, big)], star=True)
    assert not by_value and len(data) < 200
    assert len(buffers) == 1 and buffers[0] is big  # once, the object itself
    data, by_value, buffers = _pickle_tasks([(big, lambda: 0)], star=True)
    assert by_value and len(data) < 2000 and buffers == (big,)
    data, _, buffers = _pickle_tasks([bytes(OUT_OF_BAND_FROM - 1)], star=False)
    assert buffers == () and len(data) >= OUT_OF_BAND_FROM - 1  # smaller ones stay in band


def test_chunks_of_plain_values_are_pickled_directly() -> None:
    # The common case (numbers, short strings) skips pickle_value's machinery; anything that
    # could refer to a class, need dill or travel out of band does not.
    tasks = [1, "a", None, 2.5, True, b"x", 3j]
    assert _pickle_tasks(tasks, star=False) == (pickle.dumps(tasks, protocol=5), False, ())
    assert _pickle_tasks([(1, "a"), (2, b"b")], star=True)[1:] == (False, ())
    assert _plain(tasks, star=False) and _plain([(1, "a"), ()], star=True)
    for odd in ([Tagged(b"x")], [bytes(OUT_OF_BAND_FROM)], [[1]], [(1,)], [lambda: 0]):
        assert not _plain(odd, star=False), odd
    assert not _plain([(1, [2])], star=True) and not _plain([1], star=True)
    assert not _plain([(1,), (bytes(OUT_OF_BAND_FROM),)], star=True)
    assert _plain([(b"x" * (OUT_OF_BAND_FROM - 1),)], star=True)
    assert pickle.loads(_pickle_tasks([Tagged(b"x")], star=False)[0]) == [Tagged(b"x")]


def test_latch_wakes_every_waiter_once_set_and_times_out_before() -> None:
    latch = _Latch()
    started = time.monotonic()
    assert not latch.wait(0.05) and time.monotonic() - started >= 0.04
    assert not latch.wait(-1) and not latch.is_set()
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(latch.wait())) for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    latch.set()
    for waiter in waiters:
        waiter.join(10)
    assert woken == [True] * 4 and latch.is_set() and latch.wait(0) and latch.wait()


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _all_feeds_ready(pool: BigPool) -> bool:
    return len(pool._scheduler.feeds) == 2 and all(f.ready for f in pool._scheduler.feeds)


def test_long_tasks_of_a_function_learnt_as_quick_still_spread_over_every_slot() -> None:
    # What a function took before says little about its next arguments: once it is known as
    # quick, a map of long calls is first queued deep on one machine, and the other must not
    # sit idle while that machine holds a queue.
    with BigPool(2, system="local") as pool:
        wait_until(lambda: _all_feeds_ready(pool), 30, "both machines")
        pool.map(pid_after, [0.0] * 200, chunksize=1)
        pids = pool.map(pid_after, [0.25] * 8, chunksize=1)
        counts = sorted(pids.count(pid) for pid in set(pids))
        assert len(counts) == 2 and counts[0] >= 3, counts



@pytest.mark.parametrize("maxtasksperchild", [None, 100_000],
                         ids=["sent-ahead-to-workers", "queued-on-machines"])
def test_a_long_call_does_not_hold_quick_ones_queued_behind_it(
        maxtasksperchild: int | None) -> None:
    # A quick function's call turns out long: the calls its machine holds behind it (queued
    # there, or already sent ahead to its worker process) are taken back and run elsewhere.
    # With maxtasksperchild nothing is sent ahead to workers: only the machine's queue holds.
    with BigPool(2, system="local", maxtasksperchild=maxtasksperchild) as pool:
        wait_until(lambda: _all_feeds_ready(pool), 30, "both machines")
        pool.map(pid_after, [0.0] * 200, chunksize=1)
        long_call = pool.apply_async(pid_after, (60.0,))
        wait_until(lambda: sum(len(f.in_flight) for f in pool._scheduler.feeds) == 1, 10,
                   "the long call to be sent")
        quick = pool.map_async(pid_after, [0.01] * 100, chunksize=1)
        assert len(quick.get(timeout=30)) == 100
        assert not long_call.ready()
