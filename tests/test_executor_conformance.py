"""Conformance of ``bigpool.BigPoolExecutor`` to ``concurrent.futures.ProcessPoolExecutor``.

Runs against the stdlib (the reference, which must pass every test not marked bigpool-only)
and against BigPoolExecutor on the ``test`` and ``local`` systems. Stateless tests share one
2-worker executor per backend (``executor``); lifecycle tests make their own
(``make_executor``). Task functions live in ``pool_tasks`` so the stdlib can pickle them.

Stdlib behaviours pinned here:

* ``map`` submits everything at the call: an input iterable's exception is raised by the
  call itself; iterating raises a task's exception at its position and stops there.
* ``map(timeout=)`` counts from the call and raises ``concurrent.futures.TimeoutError``.
* a worker that fails its initializer, or exits mid-task, breaks the pool: the futures raise
  ``concurrent.futures.process.BrokenProcessPool`` (bigpool: a subclass of it).
* ``shutdown(cancel_futures=True)`` cancels the futures that have not started.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing.pool
import os
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pool_tasks
import pytest
from pool_support import (
    BACKENDS,
    Gates,
    bigpool_only,
    needs_processes,
    new_executor,
    require,
    wait_until,
)

import bigpool

pytestmark = pytest.mark.timeout(60)

T = 30


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require(request.param, "BigPoolExecutor")
    return str(request.param)


@pytest.fixture(scope="module")
def executor(backend: str) -> Iterator[Any]:
    ex = new_executor(backend, 2)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Gates]:
    g = Gates(tmp_path / "gates")
    try:
        yield g
    finally:
        g.open_all()


@pytest.fixture
def make_executor(backend: str, gates: Gates) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(*args: Any, **kw: Any) -> Any:
        ex = new_executor(backend, *args, **kw)
        made.append(ex)
        return ex

    try:
        yield make
    finally:
        gates.open_all()
        for ex in made:
            ex.shutdown(wait=True, cancel_futures=True)


def squares(xs: Any) -> list[int]:
    return [x * x for x in xs]


# --- submit, futures, wait, as_completed ----------------------------------------------------


def test_submit_returns_a_real_future(executor: Any) -> None:
    f = executor.submit(pool_tasks.square, 7)
    assert isinstance(f, concurrent.futures.Future)
    assert f.result(T) == 49
    assert f.done() and not f.cancelled() and f.exception() is None


def test_submit_positional_and_keyword_args(executor: Any) -> None:
    assert executor.submit(pool_tasks.kw_task, 1).result(T) == (1, "b-default", "c-default")
    assert executor.submit(pool_tasks.kw_task, 1, 2, c=3).result(T) == (1, 2, 3)
    assert executor.submit(pool_tasks.kw_task, a=1, c=3).result(T) == (1, "b-default", 3)
    # fn is positional-only: "fn" and "self" may be the task's own keyword arguments
    got = executor.submit(pool_tasks.echo_args, 1, fn="f", self="s").result(T)
    assert got == ((1,), {"fn": "f", "self": "s"})


def test_executor_is_an_executor(executor: Any) -> None:
    assert isinstance(executor, concurrent.futures.Executor)


def test_done_callback(executor: Any) -> None:
    called: list[Any] = []
    f = executor.submit(pool_tasks.square, 5)
    f.add_done_callback(lambda fut: called.append(fut.result()))
    assert f.result(T) == 25
    wait_until(lambda: called, T, "the done callback")
    assert called == [25]
    f.add_done_callback(lambda fut: called.append(-fut.result()))  # done: runs at once
    assert called == [25, -25]


def test_wait_and_as_completed(executor: Any) -> None:
    fs = [executor.submit(pool_tasks.square, i) for i in range(8)]
    done, not_done = concurrent.futures.wait(fs, timeout=T)
    assert done == set(fs) and not not_done
    assert sorted(f.result() for f in done) == squares(range(8))

    fs = [executor.submit(pool_tasks.square, i) for i in range(8)]
    seen = list(concurrent.futures.as_completed(fs, timeout=T))
    assert set(seen) == set(fs) and len(seen) == len(fs)

    fs = [executor.submit(pool_tasks.square, 2), executor.submit(pool_tasks.fail_on_three, 3)]
    done, _ = concurrent.futures.wait(fs, timeout=T, return_when=concurrent.futures.ALL_COMPLETED)
    assert done == set(fs)
    done, _ = concurrent.futures.wait(
        fs, timeout=T, return_when=concurrent.futures.FIRST_EXCEPTION
    )
    assert fs[1] in done


def test_wait_first_completed_and_timeouts(executor: Any, gates: Gates) -> None:
    gate = gates.new()
    slow = executor.submit(pool_tasks.wait_for, gate.path, "slow")
    fast = executor.submit(pool_tasks.square, 4)
    done, not_done = concurrent.futures.wait(
        [slow, fast], timeout=T, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert fast in done and slow in not_done
    with pytest.raises(concurrent.futures.TimeoutError):
        slow.result(timeout=0.2)
    with pytest.raises(concurrent.futures.TimeoutError):
        slow.exception(timeout=0.1)
    with pytest.raises(concurrent.futures.TimeoutError):
        list(concurrent.futures.as_completed([slow], timeout=0.2))
    gate.open()
    assert slow.result(T) == "slow"


# --- map ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_order(executor: Any, chunksize: int) -> None:
    assert list(executor.map(pool_tasks.square, range(20), chunksize=chunksize)) == squares(
        range(20)
    )


def test_map_chunksize_below_one_is_value_error(executor: Any) -> None:
    with pytest.raises(ValueError):
        executor.map(pool_tasks.square, range(3), chunksize=0)
    assert executor.submit(pool_tasks.square, 2).result(T) == 4


def test_map_generator_and_empty(executor: Any) -> None:
    assert list(executor.map(pool_tasks.square, (i for i in range(10)))) == squares(range(10))
    assert list(executor.map(pool_tasks.square, [])) == []
    assert list(executor.map(pool_tasks.square, [], chunksize=5)) == []
    assert list(executor.map(pool_tasks.add, [], [])) == []


def test_map_multiple_iterables(executor: Any) -> None:
    got = executor.map(pool_tasks.add3, [1, 2, 3], [10, 20, 30], [100, 200, 300])
    assert list(got) == [111, 222, 333]
    # stops at the shortest, like the builtin map
    assert list(executor.map(pool_tasks.add, [1, 2, 3], [10, 20])) == [11, 22]
    got = executor.map(pool_tasks.add, range(10), (i for i in range(10)), chunksize=3)
    assert list(got) == [2 * i for i in range(10)]


def test_map_timeout(executor: Any, gates: Gates) -> None:
    gate = gates.new()
    it = executor.map(pool_tasks.wait_for, [gate.path] * 3, timeout=0.3)
    with pytest.raises(concurrent.futures.TimeoutError):
        list(it)
    gate.open()
    assert executor.submit(pool_tasks.square, 3).result(T) == 9


def test_map_exception_propagates(executor: Any) -> None:
    it = executor.map(pool_tasks.fail_on_three, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"^task failed on 3$"):
        next(it)
    with pytest.raises(ValueError, match="task failed on 3"):
        list(executor.map(pool_tasks.fail_on_three, range(6), chunksize=2))


def test_map_input_iterable_error_raised_by_the_call(executor: Any) -> None:
    with pytest.raises(KeyError, match="input iterable failed at 3"):
        executor.map(pool_tasks.square, pool_tasks.errors_at(6, 3))
    assert executor.submit(pool_tasks.square, 3).result(T) == 9


# --- exceptions -----------------------------------------------------------------------------


def test_exception_from_result(backend: str, executor: Any) -> None:
    f = executor.submit(pool_tasks.raise_task_error, "custom message")
    with pytest.raises(pool_tasks.TaskError) as info:
        f.result(T)
    assert type(info.value) is pool_tasks.TaskError
    assert str(info.value) == "custom message"
    assert info.value.args == ("custom message",)
    exc = f.exception(T)
    assert type(exc) is pool_tasks.TaskError
    cause = info.value.__cause__
    assert cause is not None and "raise_task_error" in str(cause)
    if backend != "stdlib":  # the stdlib's is concurrent.futures.process._RemoteTraceback
        assert isinstance(cause, multiprocessing.pool.RemoteTraceback)


def test_unpicklable_argument_and_result(executor: Any) -> None:
    f = executor.submit(pool_tasks.square, (i for i in range(3)))
    with pytest.raises(TypeError, match="generator"):
        f.result(T)
    f = executor.submit(pool_tasks.return_generator)
    with pytest.raises(TypeError, match="generator"):
        f.result(T)
    assert executor.submit(pool_tasks.square, 3).result(T) == 9


# --- cancellation and shutdown --------------------------------------------------------------


def test_cancel_a_queued_future(make_executor: Callable[..., Any], gates: Gates) -> None:
    ex = make_executor(2)
    gate = gates.new()
    busy = [ex.submit(pool_tasks.mark_and_wait, gate.markers, gate.path, i) for i in range(2)]
    wait_until(lambda: gate.started() == 2, T, "both workers to be busy")
    queued = [ex.submit(pool_tasks.square, i) for i in range(10)]
    last = queued[-1]
    assert last.cancel() is True
    assert last.cancelled() and last.done()
    with pytest.raises(concurrent.futures.CancelledError):
        last.result(0)
    gate.open()
    assert [f.result(T) for f in busy] == [0, 1]
    assert [f.result(T) for f in queued[:-1]] == squares(range(9))
    assert last.cancelled()
    # a finished future cannot be cancelled
    assert busy[0].cancel() is False


def test_shutdown_wait_true_waits(make_executor: Callable[..., Any]) -> None:
    ex = make_executor(2)
    fs = [ex.submit(pool_tasks.sleep_return, 0.2, i) for i in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in fs)
    assert [f.result(0) for f in fs] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        ex.submit(pool_tasks.square, 1)
    with pytest.raises(RuntimeError):
        ex.map(pool_tasks.square, [1])
    ex.shutdown()  # idempotent


def test_context_manager_shuts_down(make_executor: Callable[..., Any]) -> None:
    ex = make_executor(2)
    with ex as entered:
        assert entered is ex
        fs = [ex.submit(pool_tasks.sleep_return, 0.1, i) for i in range(4)]
    assert [f.result(0) for f in fs] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        ex.submit(pool_tasks.square, 1)


def test_shutdown_cancel_futures(make_executor: Callable[..., Any], gates: Gates) -> None:
    ex = make_executor(2)
    gate = gates.new()
    busy = [ex.submit(pool_tasks.mark_and_wait, gate.markers, gate.path, i) for i in range(2)]
    wait_until(lambda: gate.started() == 2, T, "both workers to be busy")
    queued = [ex.submit(pool_tasks.square, i) for i in range(10)]
    ex.shutdown(wait=False, cancel_futures=True)
    wait_until(lambda: queued[-1].cancelled(), T, "the last queued future to be cancelled")
    with pytest.raises(RuntimeError):
        ex.submit(pool_tasks.square, 1)
    gate.open()
    # (a second shutdown(wait=True) does not wait in the stdlib: the first forgot the threads)
    assert [f.result(T) for f in busy] == [0, 1]
    for i, f in enumerate(queued):
        assert f.cancelled() or f.result(T) == i * i
    assert sum(f.cancelled() for f in queued) >= 5


def test_max_workers_must_be_positive(backend: str) -> None:
    with pytest.raises(ValueError):
        new_executor(backend, 0)
    with pytest.raises(ValueError):
        new_executor(backend, -1)


# --- worker processes -----------------------------------------------------------------------


def test_initializer(backend: str, make_executor: Callable[..., Any], tmp_path: Path) -> None:
    ex = make_executor(2, initializer=pool_tasks.record_init, initargs=(str(tmp_path), "tag-2"))
    seen = list(ex.map(pool_tasks.pid_and_tag, range(20)))
    assert {tag for _, tag in seen} == {"tag-2"}
    ex.shutdown(wait=True)
    inits = [int(line) for line in (tmp_path / "inits").read_text().split()]
    assert inits, "the initializer never ran"
    if backend != "test":
        assert len(inits) == len(set(inits)), inits
        assert {pid for pid, _ in seen} <= set(inits)


def test_initializer_failure_breaks_the_pool(make_executor: Callable[..., Any]) -> None:
    ex = make_executor(2, initializer=pool_tasks.failing_init)
    f = ex.submit(pool_tasks.square, 2)
    with pytest.raises(BrokenProcessPool):
        f.result(T)
    assert isinstance(f.exception(0), BrokenProcessPool)


def test_worker_exit_breaks_the_future(backend: str, make_executor: Callable[..., Any]) -> None:
    needs_processes(backend)
    ex = make_executor(2)
    assert ex.submit(pool_tasks.square, 2).result(T) == 4
    f = ex.submit(pool_tasks.exit_process, 1)
    with pytest.raises(BrokenProcessPool) as info:
        f.result(T)
    if backend != "stdlib":
        # bigpool says why: the machine's exit code
        assert re.search(r"exit\w*\W+(?:with\W+)?code\W*1\b", str(info.value), re.I), str(
            info.value
        )


def test_max_tasks_per_child_gives_new_processes(
    backend: str, make_executor: Callable[..., Any]
) -> None:
    needs_processes(backend)
    if backend == "stdlib" and sys.version_info < (3, 11):
        pytest.skip("max_tasks_per_child is new in Python 3.11")
    ex = make_executor(2, max_tasks_per_child=1)
    pids = [ex.submit(pool_tasks.pid).result(T) for _ in range(4)]
    assert len(set(pids)) == 4, pids
    assert os.getpid() not in pids


# --- bigpool only ---------------------------------------------------------------------------


def module_level_function(x: int) -> int:
    return x + 1000


def test_lambdas_closures_and_test_module_functions(backend: str, executor: Any) -> None:
    bigpool_only(backend, "the stdlib pickles functions by reference")
    offset = 17

    def closure(x: int) -> int:
        return x + offset

    assert executor.submit(lambda x, y=2: x * y, 4, y=3).result(T) == 12
    assert executor.submit(closure, 1).result(T) == 18
    assert list(executor.map(module_level_function, range(3))) == [1000, 1001, 1002]
    assert list(executor.map(lambda a, b: a - b, [5, 6], [1, 2])) == [4, 4]


def test_compat_futures_reexports() -> None:
    cf = pytest.importorskip("bigpool.compat.futures")
    require("test", "BigPoolExecutor")
    assert cf.ProcessPoolExecutor is bigpool.BigPoolExecutor  # type: ignore[attr-defined]
    for name in (
        "Future",
        "wait",
        "as_completed",
        "TimeoutError",
        "CancelledError",
        "FIRST_COMPLETED",
        "FIRST_EXCEPTION",
        "ALL_COMPLETED",
        "BrokenExecutor",
        "Executor",
    ):
        assert getattr(cf, name) is getattr(concurrent.futures, name), name
    with cf.ProcessPoolExecutor(2, system="test") as ex:
        f = ex.submit(pool_tasks.square, 3)
        assert isinstance(f, cf.Future)
        assert f.result(T) == 9
        assert list(cf.as_completed([f], timeout=T)) == [f]


def test_bigpool_errors_are_stdlib_classes() -> None:
    require("test", "BigPoolExecutor")
    broken = getattr(bigpool, "BrokenExecutor", None)
    if broken is None:
        pytest.skip("bigpool.BrokenExecutor not exported")
    assert issubclass(broken, concurrent.futures.BrokenExecutor)

