"""Conformance of ``bigpool.BigPool`` to ``multiprocessing.pool.Pool``.

Every test runs against the stdlib (the reference, which must pass every test not marked
bigpool-only) and against BigPool on the ``test`` and ``local`` systems. Stateless tests share
one 2-worker pool per backend (``pool``); tests about a pool's lifecycle make their own
(``make_pool``). Task functions live in ``pool_tasks`` so the stdlib can pickle them.

Stdlib behaviours pinned here that are easy to get wrong:

* ``imap`` with chunksize 1: a task's exception is raised by ``next()`` at that task's
  position, and the following ``next()`` calls go on with the later results.
* an exception raised by the *input iterable*: ``map`` and ``map_async`` raise it from the
  call itself (they turn the iterable into a list first); ``imap`` yields the results before
  the failing position, raises the iterable's exception there (no ``__cause__``), then stops.
* ``map_async([])`` is ready at once and never calls its callback.
* an unpicklable argument does not raise from ``apply_async``/``map_async``: the
  ``TypeError`` arrives through the AsyncResult; an unpicklable result is a
  ``MaybeEncodingError``.
* ``terminate()`` leaves pending AsyncResults unresolved (never ready).
* ``AsyncResult.successful()`` before the result is ready raises ``ValueError``.
* ``get(timeout)`` raises ``multiprocessing.TimeoutError`` (not the builtin one) and the result
  can still be fetched later; callbacks run before ``get()`` returns, on another thread.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.pool
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pool_tasks
import pytest
from pool_support import (
    BACKENDS,
    Gates,
    bigpool_only,
    needs_processes,
    new_pool,
    require,
    wait_until,
)

import bigpool

pytestmark = pytest.mark.timeout(60)

# What to wait for a result that should come at once, at most (a hang fails, it does not hang).
T = 30


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require(request.param, "BigPool")
    return str(request.param)


@pytest.fixture(scope="module")
def pool(backend: str) -> Iterator[Any]:
    """One 2-worker pool per backend, shared by the tests that leave it as they found it."""
    p = new_pool(backend, 2)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Gates]:
    g = Gates(tmp_path / "gates")
    try:
        yield g
    finally:
        g.open_all()


@pytest.fixture
def make_pool(backend: str, gates: Gates) -> Iterator[Callable[..., Any]]:
    """``make_pool(processes=2, initializer=None, initargs=(), maxtasksperchild=None)``: a
    fresh pool of this backend, terminated and joined at teardown (after gates open)."""
    made: list[Any] = []

    def make(*args: Any, **kw: Any) -> Any:
        p = new_pool(backend, *args, **kw)
        made.append(p)
        return p

    try:
        yield make
    finally:
        gates.open_all()
        for p in made:
            p.terminate()
            p.join()


def squares(xs: Any) -> list[int]:
    return [x * x for x in xs]


def drain(it: Iterator[Any], limit: int = 1000) -> list[Any]:
    """Every value from ``it``; an exception raised by ``next`` is recorded and iteration
    goes on, until StopIteration (as a caller that catches per item would see it)."""
    out: list[Any] = []
    for _ in range(limit):
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except Exception as e:
            out.append(e)
    raise AssertionError(f"iterator did not stop after {limit} items: {out[:20]}...")


def assert_remote_cause(exc: BaseException, function_name: str) -> None:
    cause = exc.__cause__
    assert isinstance(cause, multiprocessing.pool.RemoteTraceback), repr(cause)
    assert "Traceback (most recent call last)" in str(cause)
    assert function_name in str(cause)
    assert function_name in cause.tb  # the stdlib's RemoteTraceback keeps the text as .tb


# --- results and their order ----------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_order(pool: Any, chunksize: int) -> None:
    assert pool.map(pool_tasks.square, range(20), chunksize) == squares(range(20))
    assert pool.map(pool_tasks.square, range(20), chunksize=chunksize) == squares(range(20))


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_async_order(pool: Any, chunksize: int) -> None:
    r = pool.map_async(pool_tasks.square, range(20), chunksize)
    assert r.get(T) == squares(range(20))
    assert r.ready()
    assert r.successful()


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_imap_order(pool: Any, chunksize: int) -> None:
    assert list(pool.imap(pool_tasks.square, range(20), chunksize)) == squares(range(20))


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_imap_unordered_same_multiset(pool: Any, chunksize: int) -> None:
    got = list(pool.imap_unordered(pool_tasks.square, range(20), chunksize))
    assert sorted(got) == squares(range(20))


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_starmap_order(pool: Any, chunksize: int) -> None:
    pairs = [(i, 10 * i) for i in range(20)]
    assert pool.starmap(pool_tasks.add, pairs, chunksize) == [11 * i for i in range(20)]


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_starmap_async_order(pool: Any, chunksize: int) -> None:
    triples = [(i, 10 * i, 100 * i) for i in range(20)]
    r = pool.starmap_async(pool_tasks.add3, triples, chunksize)
    assert r.get(T) == [111 * i for i in range(20)]


def test_imap_chunksize_below_one_is_value_error(pool: Any) -> None:
    with pytest.raises(ValueError):
        pool.imap(pool_tasks.square, range(3), 0)
    with pytest.raises(ValueError):
        pool.imap_unordered(pool_tasks.square, range(3), 0)
    assert pool.apply(pool_tasks.square, (2,)) == 4


def test_imap_is_an_iterator(pool: Any) -> None:
    it = pool.imap(pool_tasks.square, range(3))
    assert iter(it) is it
    assert next(it) == 0
    assert list(it) == [1, 4]
    it = pool.imap_unordered(pool_tasks.square, range(3))
    assert iter(it) is it
    assert sorted(it) == [0, 1, 4]


def test_imap_next_timeout(pool: Any, gates: Gates) -> None:
    gate = gates.new()
    it = pool.imap(pool_tasks.wait_for, [gate.path])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.2)
    gate.open()
    assert it.next(timeout=T) is None
    with pytest.raises(StopIteration):
        it.next(timeout=T)


def test_generators_as_input(pool: Any) -> None:
    assert pool.map(pool_tasks.square, (i for i in range(10))) == squares(range(10))
    assert pool.map_async(pool_tasks.square, (i for i in range(10))).get(T) == squares(range(10))
    assert list(pool.imap(pool_tasks.square, (i for i in range(10)), 3)) == squares(range(10))
    got = pool.imap_unordered(pool_tasks.square, (i for i in range(10)))
    assert sorted(got) == squares(range(10))
    pairs = ((i, i) for i in range(10))
    assert pool.starmap(pool_tasks.add, pairs) == [2 * i for i in range(10)]
    pairs = ((i, i) for i in range(10))
    assert pool.starmap_async(pool_tasks.add, pairs).get(T) == [2 * i for i in range(10)]


@pytest.mark.parametrize("make_input", [list, lambda: (i for i in ())], ids=["list", "generator"])
def test_empty_inputs(pool: Any, make_input: Callable[[], Any]) -> None:
    f = pool_tasks.square
    assert pool.map(f, make_input()) == []
    assert pool.map(f, make_input(), 3) == []
    assert pool.map_async(f, make_input()).get(T) == []
    assert list(pool.imap(f, make_input())) == []
    assert list(pool.imap(f, make_input(), 3)) == []
    assert list(pool.imap_unordered(f, make_input())) == []
    assert pool.starmap(pool_tasks.add, make_input()) == []
    assert pool.starmap_async(pool_tasks.add, make_input()).get(T) == []


def test_empty_map_async_callback(pool: Any) -> None:
    """The stdlib never calls the callback of an empty map_async (its result is ready at
    once, without it); calling it once with ``[]`` is tolerated, more is not."""
    got: list[Any] = []
    r = pool.map_async(pool_tasks.square, [], callback=got.append)
    assert r.get(T) == []
    assert r.ready() and r.successful()
    assert pool.apply(pool_tasks.square, (1,)) == 1
    assert got in ([], [[]])


def test_apply_args_and_kwds(pool: Any) -> None:
    assert pool.apply(pool_tasks.square, (7,)) == 49
    assert pool.apply(pool_tasks.kw_task, ("x",)) == ("x", "b-default", "c-default")
    assert pool.apply(pool_tasks.kw_task, ("x", "y"), {"c": "z"}) == ("x", "y", "z")
    assert pool.apply(pool_tasks.kw_task, (), {"a": 1, "b": 2, "c": 3}) == (1, 2, 3)
    assert pool.apply(pool_tasks.echo_args) == ((), {})


def test_apply_async_args_and_kwds(pool: Any) -> None:
    r = pool.apply_async(pool_tasks.kw_task, ("x",), {"b": "y", "c": "z"})
    assert r.get(T) == ("x", "y", "z")
    r = pool.apply_async(pool_tasks.kw_task, args=(1,), kwds={"c": 3})
    assert r.get(T) == (1, "b-default", 3)
    r = pool.apply_async(pool_tasks.echo_args, (1, [2], {"three": 3}), {"k": (4,)})
    assert r.get(T) == ((1, [2], {"three": 3}), {"k": (4,)})


def test_many_concurrent_apply_async(pool: Any) -> None:
    results = [pool.apply_async(pool_tasks.square, (i,)) for i in range(100)]
    assert [r.get(T) for r in results] == squares(range(100))


# --- callbacks ------------------------------------------------------------------------------


def test_callback_called_once_on_another_thread(pool: Any) -> None:
    calls: list[tuple[Any, int]] = []
    errors: list[Any] = []

    def callback(value: Any) -> None:
        calls.append((value, threading.get_ident()))

    r = pool.apply_async(pool_tasks.square, (6,), callback=callback, error_callback=errors.append)
    assert r.get(T) == 36
    wait_until(lambda: calls, T, "the callback")
    # A later, unrelated result makes a second call to the callback (if any) have had time.
    assert pool.apply(pool_tasks.square, (1,)) == 1
    assert [value for value, _ in calls] == [36]
    assert calls[0][1] != threading.get_ident()
    assert errors == []


def test_error_callback_called_once_on_another_thread(pool: Any) -> None:
    calls: list[Any] = []
    errors: list[tuple[BaseException, int]] = []

    def error_callback(exc: BaseException) -> None:
        errors.append((exc, threading.get_ident()))

    r = pool.apply_async(
        pool_tasks.fail_on_three, (3,), callback=calls.append, error_callback=error_callback
    )
    with pytest.raises(ValueError, match="task failed on 3"):
        r.get(T)
    wait_until(lambda: errors, T, "the error callback")
    assert pool.apply(pool_tasks.square, (1,)) == 1
    assert len(errors) == 1
    exc, thread = errors[0]
    assert type(exc) is ValueError
    assert str(exc) == "task failed on 3"
    assert thread != threading.get_ident()
    assert calls == []


def test_callback_runs_before_get_returns(pool: Any) -> None:
    """The stdlib calls the callback, then marks the result ready: once ``get()`` returns,
    the callback has run (code that collects results in a callback relies on this)."""
    for _ in range(5):
        got: list[Any] = []
        errs: list[Any] = []
        assert pool.apply_async(pool_tasks.square, (3,), callback=got.append).get(T) == 9
        assert got == [9]
        r = pool.apply_async(pool_tasks.fail_on_three, (3,), error_callback=errs.append)
        with pytest.raises(ValueError):
            r.get(T)
        assert len(errs) == 1


def test_map_async_callbacks(pool: Any) -> None:
    results: list[tuple[Any, int]] = []
    r = pool.map_async(
        pool_tasks.square,
        range(10),
        3,
        callback=lambda v: results.append((v, threading.get_ident())),
    )
    assert r.get(T) == squares(range(10))
    wait_until(lambda: results, T, "the map_async callback")
    assert [v for v, _ in results] == [squares(range(10))]
    assert results[0][1] != threading.get_ident()

    errors: list[BaseException] = []
    calls: list[Any] = []
    r = pool.map_async(
        pool_tasks.fail_on_three, range(6), callback=calls.append, error_callback=errors.append
    )
    with pytest.raises(ValueError, match="task failed on 3"):
        r.get(T)
    wait_until(lambda: errors, T, "the map_async error callback")
    assert pool.apply(pool_tasks.square, (1,)) == 1
    assert len(errors) == 1 and type(errors[0]) is ValueError
    assert calls == []


def test_starmap_async_callback(pool: Any) -> None:
    results: list[Any] = []
    r = pool.starmap_async(pool_tasks.add, [(1, 2), (3, 4)], callback=results.append)
    assert r.get(T) == [3, 7]
    wait_until(lambda: results, T, "the starmap_async callback")
    assert results == [[3, 7]]


# --- AsyncResult ----------------------------------------------------------------------------


def test_get_timeout_then_success(pool: Any, gates: Gates) -> None:
    gate = gates.new()
    r = pool.apply_async(pool_tasks.wait_for, (gate.path, "done"))
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.2)
    assert not r.ready()
    assert r.wait(0.1) is None
    assert not r.ready()
    with pytest.raises(ValueError):
        r.successful()
    gate.open()
    assert r.get(timeout=T) == "done"
    assert r.ready()
    assert r.successful()
    assert r.wait(0) is None


def test_map_async_get_timeout_then_success(pool: Any, gates: Gates) -> None:
    gate = gates.new()
    r = pool.map_async(pool_tasks.wait_for, [gate.path] * 3, 1)
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(0.2)
    assert not r.ready()
    with pytest.raises(ValueError):
        r.successful()
    gate.open()
    r.wait(T)
    assert r.ready()
    assert r.successful()
    assert r.get(0) == [None, None, None]


def test_successful_false_after_failure(pool: Any) -> None:
    r = pool.apply_async(pool_tasks.fail_on_three, (3,))
    r.wait(T)
    assert r.ready()
    assert r.successful() is False
    with pytest.raises(ValueError):
        r.get(0)


# --- exceptions -----------------------------------------------------------------------------


def test_exception_in_apply(pool: Any) -> None:
    with pytest.raises(pool_tasks.TaskError) as info:
        pool.apply(pool_tasks.raise_task_error, ("custom message",))
    assert type(info.value) is pool_tasks.TaskError
    assert str(info.value) == "custom message"
    assert info.value.args == ("custom message",)
    assert_remote_cause(info.value, "raise_task_error")


def test_exception_in_apply_async(pool: Any) -> None:
    r = pool.apply_async(pool_tasks.fail_on_three, (3,))
    with pytest.raises(ValueError) as info:
        r.get(T)
    assert type(info.value) is ValueError
    assert str(info.value) == "task failed on 3"
    assert_remote_cause(info.value, "fail_on_three")


@pytest.mark.parametrize("chunksize", [1, 2])
def test_exception_in_map(pool: Any, chunksize: int) -> None:
    with pytest.raises(ValueError, match=r"^task failed on 3$") as info:
        pool.map(pool_tasks.fail_on_three, range(8), chunksize)
    assert_remote_cause(info.value, "fail_on_three")
    with pytest.raises(ValueError, match=r"^task failed on 3$"):
        pool.starmap(pool_tasks.fail_on_three, [(i,) for i in range(8)], chunksize)
    # the pool is still usable
    assert pool.map(pool_tasks.square, range(4)) == [0, 1, 4, 9]


def test_exception_in_imap_continues(pool: Any) -> None:
    """chunksize 1: the exception comes at its position, then the later results."""
    got = drain(pool.imap(pool_tasks.fail_on_three, range(6)))
    assert got[:3] == [0, 1, 2]
    assert isinstance(got[3], ValueError) and str(got[3]) == "task failed on 3"
    assert_remote_cause(got[3], "fail_on_three")
    assert got[4:] == [4, 5]


def test_exception_in_imap_unordered_continues(pool: Any) -> None:
    got = drain(pool.imap_unordered(pool_tasks.fail_on_three, range(6)))
    errors = [x for x in got if isinstance(x, BaseException)]
    assert sorted(x for x in got if not isinstance(x, BaseException)) == [0, 1, 2, 4, 5]
    assert len(errors) == 1 and type(errors[0]) is ValueError


def test_exception_in_chunked_imap(pool: Any) -> None:
    """With chunks, a failing chunk raises after the results before it (what comes after is
    left unspecified: the stdlib stops there)."""
    it = pool.imap(pool_tasks.fail_on_three, range(9), 3)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="task failed on 3"):
        next(it)


def test_input_iterable_error_in_map(pool: Any) -> None:
    """The stdlib lists the input first: map and map_async raise the iterable's own
    exception from the call itself."""
    with pytest.raises(KeyError, match="input iterable failed at 3"):
        pool.map(pool_tasks.square, pool_tasks.errors_at(6, 3))
    with pytest.raises(KeyError, match="input iterable failed at 3"):
        pool.map_async(pool_tasks.square, pool_tasks.errors_at(6, 3))
    with pytest.raises(KeyError, match="input iterable failed at 3"):
        pool.starmap(pool_tasks.add, ((i, i) for i in pool_tasks.errors_at(6, 3)))
    assert pool.map(pool_tasks.square, range(3)) == [0, 1, 4]


def test_input_iterable_error_in_imap(pool: Any) -> None:
    """imap (chunksize 1) yields the results before the failing position, raises the
    iterable's exception at that position, then stops."""
    got = drain(pool.imap(pool_tasks.square, pool_tasks.errors_at(6, 3)))
    assert got[:3] == [0, 1, 4]
    assert len(got) == 4, got
    assert type(got[3]) is KeyError and "input iterable failed at 3" in str(got[3])
    assert pool.map(pool_tasks.square, range(3)) == [0, 1, 4]


def test_input_iterable_error_in_imap_unordered(pool: Any) -> None:
    got = drain(pool.imap_unordered(pool_tasks.square, pool_tasks.errors_at(6, 3)))
    assert sorted(x for x in got if not isinstance(x, BaseException)) == [0, 1, 4]
    errors = [x for x in got if isinstance(x, BaseException)]
    assert len(errors) == 1 and type(errors[0]) is KeyError


def test_unpicklable_argument(pool: Any) -> None:
    """A generator object: neither pickle nor dill can send it. Raises, does not hang."""
    r = pool.apply_async(pool_tasks.square, ((i for i in range(3)),))
    with pytest.raises(TypeError, match="generator"):
        r.get(T)
    assert r.ready() and not r.successful()
    r = pool.map_async(pool_tasks.square, [1, (i for i in range(3)), 2])
    with pytest.raises(TypeError, match="generator"):
        r.get(T)
    assert pool.map(pool_tasks.square, range(5)) == squares(range(5))
    assert pool.apply(pool_tasks.square, (5,)) == 25


def test_unpicklable_result(pool: Any) -> None:
    r = pool.apply_async(pool_tasks.return_generator, (1,))
    with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
        r.get(T)
    assert "generator" in str(info.value)
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        pool.map(pool_tasks.return_generator, range(4))
    assert pool.map(pool_tasks.square, range(5)) == squares(range(5))
    assert pool.apply(pool_tasks.square, (5,)) == 25


# --- lifecycle ------------------------------------------------------------------------------


def test_processes_zero_is_value_error(backend: str) -> None:
    with pytest.raises(ValueError):
        new_pool(backend, 0)
    with pytest.raises(ValueError):
        new_pool(backend, -1)


def test_close_lets_pending_work_finish_then_refuses_work(make_pool: Callable[..., Any]) -> None:
    p = make_pool(2)
    pending = [p.apply_async(pool_tasks.sleep_return, (0.05, i)) for i in range(6)]
    mapped = p.map_async(pool_tasks.square, range(10))
    p.close()
    for call in (
        lambda: p.apply(pool_tasks.square, (1,)),
        lambda: p.apply_async(pool_tasks.square, (1,)),
        lambda: p.map(pool_tasks.square, [1]),
        lambda: p.map_async(pool_tasks.square, [1]),
        lambda: p.imap(pool_tasks.square, [1]),
        lambda: p.imap_unordered(pool_tasks.square, [1]),
        lambda: p.starmap(pool_tasks.add, [(1, 2)]),
        lambda: p.starmap_async(pool_tasks.add, [(1, 2)]),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    with pytest.raises(ValueError):
        p.__enter__()
    p.join()
    assert [r.get(0) for r in pending] == list(range(6))
    assert mapped.get(0) == squares(range(10))


def test_join_before_close_is_value_error(make_pool: Callable[..., Any]) -> None:
    p = make_pool(2)
    assert p.apply(pool_tasks.square, (2,)) == 4
    with pytest.raises(ValueError):
        p.join()
    p.close()
    p.join()


def test_terminate_with_many_pending_tasks_is_prompt(make_pool: Callable[..., Any]) -> None:
    p = make_pool(2)
    assert p.apply(pool_tasks.square, (2,)) == 4  # the pool is up
    r = p.map_async(pool_tasks.sleep_return, [0.05] * 10_000, 1)
    started = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - started < 10
    assert not r.ready() or not r.successful()
    with pytest.raises(ValueError):
        p.apply(pool_tasks.square, (1,))


def test_terminate_with_many_pending_apply_async(make_pool: Callable[..., Any]) -> None:
    p = make_pool(2)
    assert p.apply(pool_tasks.square, (2,)) == 4
    for _ in range(2_000):
        p.apply_async(pool_tasks.sleep_return, (0.05,))
    started = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - started < 10


def test_context_manager(make_pool: Callable[..., Any]) -> None:
    p = make_pool(2)
    with p as entered:
        assert entered is p
        assert p.map(pool_tasks.square, range(5)) == squares(range(5))
    # __exit__ terminates
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply(pool_tasks.square, (1,))
    p.join()


def test_context_manager_terminates_running_work(make_pool: Callable[..., Any], gates: Gates) -> None:
    p = make_pool(2)
    gate = gates.new()
    started = time.monotonic()
    with p:
        p.apply_async(pool_tasks.mark_and_wait, (gate.markers, gate.path))
        wait_until(lambda: gate.started() == 1, T, "the task to start")
    p.join()
    # did not wait for the (never-opened) gate
    assert time.monotonic() - started < 15


def test_initializer_runs_once_per_worker(
    backend: str, make_pool: Callable[..., Any], tmp_path: Path
) -> None:
    p = make_pool(2, pool_tasks.record_init, (str(tmp_path), "tag-1"))
    seen = p.map(pool_tasks.pid_and_tag, range(40), 1)
    seen += [p.apply(pool_tasks.pid_and_tag) for _ in range(5)]
    assert {tag for _, tag in seen} == {"tag-1"}
    p.close()
    p.join()
    inits = [int(line) for line in (tmp_path / "inits").read_text().split()]
    assert inits, "the initializer never ran"
    if backend == "test":
        return  # in-process machines: one pid for all, nothing more to tell apart
    counts = collections.Counter(inits)
    assert all(n == 1 for n in counts.values()), counts
    assert {pid for pid, _ in seen} <= set(counts), "a task ran where the initializer did not"
    assert os.getpid() not in counts


def test_maxtasksperchild_replaces_worker(backend: str, make_pool: Callable[..., Any]) -> None:
    needs_processes(backend)
    p = make_pool(2, maxtasksperchild=1)
    pids = [p.apply(pool_tasks.pid) for _ in range(6)]
    assert len(set(pids)) == 6, pids
    assert os.getpid() not in pids


def test_maxtasksperchild_results_complete(make_pool: Callable[..., Any]) -> None:
    p = make_pool(2, maxtasksperchild=2)
    assert p.map(pool_tasks.square, range(8), 1) == squares(range(8))
    assert [p.apply(pool_tasks.square, (i,)) for i in range(3)] == [0, 1, 4]


# --- bigpool only ---------------------------------------------------------------------------


def module_level_function(x: int) -> int:
    return x + 1000


def test_lambdas_closures_and_test_module_functions(backend: str, pool: Any) -> None:
    bigpool_only(backend, "the stdlib pickles functions by reference")
    offset = 17

    def closure(x: int) -> int:
        return x + offset

    assert pool.map(lambda x: x * 3, range(5)) == [0, 3, 6, 9, 12]
    assert pool.map(closure, range(3)) == [17, 18, 19]
    assert pool.apply(lambda a, b=1: a - b, (10,), {"b": 4}) == 6
    assert list(pool.imap(module_level_function, range(3))) == [1000, 1001, 1002]
    assert pool.starmap(lambda a, b: a * b, [(2, 3), (4, 5)]) == [6, 20]


def test_machines_running(backend: str, pool: Any) -> None:
    bigpool_only(backend, "machines")
    assert pool.apply(pool_tasks.square, (3,)) == 9
    machines = pool.machines
    assert machines and all(isinstance(m, bigpool.Machine) for m in machines)
    assert all(m.state == bigpool.State.RUNNING for m in machines), machines


def test_compat_multiprocessing_reexports() -> None:
    mp = pytest.importorskip("bigpool.compat.multiprocessing")
    require("test", "BigPool")
    assert mp.Pool is bigpool.BigPool  # type: ignore[attr-defined]
    assert mp.TimeoutError is multiprocessing.TimeoutError
    for name in ("ProcessError", "AuthenticationError", "BufferTooShort", "cpu_count"):
        if hasattr(mp, name):
            assert getattr(mp, name) is getattr(multiprocessing, name), name
    with mp.Pool(2, system="test") as p:
        assert p.map(pool_tasks.square, range(4)) == [0, 1, 4, 9]
