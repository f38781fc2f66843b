"""LoopThread: a background event loop for synchronous callers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator

import pytest

from bigpool.h2rpc import LoopThread

DEADLINE = 10.0


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread(name="test-loop")
    try:
        yield loop_thread
    finally:
        loop_thread.close()


def test_run_returns_result_on_the_loop_thread(lt: LoopThread) -> None:
    async def where() -> tuple[str, int]:
        await asyncio.sleep(0)
        return threading.current_thread().name, 42

    assert lt.run(where(), timeout=DEADLINE) == ("test-loop", 42)
    assert lt.running


def test_run_propagates_exceptions(lt: LoopThread) -> None:
    async def fail() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        lt.run(fail(), timeout=DEADLINE)
    # The loop survives a failing coroutine.
    assert lt.run(asyncio.sleep(0, "still here"), timeout=DEADLINE) == "still here"


def test_run_from_the_loop_thread_raises(lt: LoopThread) -> None:
    async def nested() -> str:
        coro = asyncio.sleep(0, "inner")
        try:
            lt.run(coro)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "own thread" in lt.run(nested(), timeout=DEADLINE)


def test_run_timeout_cancels_the_coroutine(lt: LoopThread) -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises((TimeoutError, concurrent.futures.TimeoutError)):
        lt.run(forever(), timeout=0.1)
    assert started.is_set()
    assert cancelled.wait(DEADLINE)


def test_cancelling_a_submitted_future_cancels_the_coroutine(lt: LoopThread) -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = lt.submit(forever())
    assert started.wait(DEADLINE)
    future.cancel()
    assert cancelled.wait(DEADLINE)


def test_close_joins_the_thread_and_cancels_pending_work() -> None:
    lt = LoopThread(name="closing-loop")
    cancelled = threading.Event()

    started = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = lt.submit(forever())
    assert started.wait(DEADLINE)
    thread = lt._thread
    lt.close(timeout=DEADLINE)
    assert not thread.is_alive()
    assert cancelled.is_set()
    assert lt.loop.is_closed()
    assert not lt.running
    assert future.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        lt.run(asyncio.sleep(0))
    lt.close()  # a second close is harmless


def test_many_threads_can_run_at_once(lt: LoopThread) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: lt.run(double(i), timeout=DEADLINE), range(100)))
    assert results == [2 * i for i in range(100)]
