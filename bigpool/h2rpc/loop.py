"""bigpool's event loops: which loop class it runs on, and a loop on a background thread.

bigpool's public API is synchronous, as the standard library's pools are; the RPC machinery is
asyncio. :class:`LoopThread` joins the two: coroutines are submitted from any thread and their
results waited for, and cancelling the returned future cancels the coroutine.

Every loop bigpool makes for itself (the driver's :class:`LoopThread`, the test system's
machines, a machine process's main loop, see :func:`run`) comes from :func:`new_event_loop`:
a `uvloop <https://github.com/MagicStack/uvloop>`_ loop when uvloop imports, else asyncio's.
asyncio's own loop, selector and TLS layer (``asyncio.sslproto``) are pure Python and were a
large share of the CPU time of each call; on uvloop (libuv, and TLS driven from Cython) one
``BigPool.apply`` round trip measured driver CPU 520 -> 393 µs, machine CPU 400 -> 300 µs and
p50 latency 952 -> 755 µs (2-core VM). The environment variable ``BIGPOOL_EVENT_LOOP``
chooses: ``asyncio`` forces the standard library's loop (to compare, or to rule uvloop out
when chasing a problem), ``uvloop`` demands uvloop (``ImportError`` without it); unset or
empty means uvloop if installed. A machine process inherits the variable from its driver.
The RPC layer itself (:mod:`bigpool.h2rpc`) runs on whatever loop it is called on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["ENV_EVENT_LOOP", "LoopThread", "new_event_loop", "run"]

T = TypeVar("T")

ENV_EVENT_LOOP = "BIGPOOL_EVENT_LOOP"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if it imports, else asyncio's; ``$BIGPOOL_EVENT_LOOP``
    (``asyncio`` or ``uvloop``) overrides the choice. See the module's docstring for why."""
    choice = os.environ.get(ENV_EVENT_LOOP, "").strip().lower()
    if choice == "asyncio":
        return asyncio.new_event_loop()
    if choice not in ("", "uvloop"):
        raise ValueError(f"${ENV_EVENT_LOOP} must be 'asyncio' or 'uvloop', not {choice!r}")
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop from :func:`new_event_loop` (on Python 3.10 too, which
    has no ``asyncio.Runner``)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main)
    return _run_without_runner(main)


def _run_without_runner(main: Coroutine[Any, Any, T]) -> T:
    """What ``asyncio.run`` does on Python 3.10, with a loop from :func:`new_event_loop`."""
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


class LoopThread:
    """Runs an event loop (from :func:`new_event_loop`) on a daemon thread until :meth:`close`."""

    def __init__(self, name: str = "bigpool-loop") -> None:
        self.loop = new_event_loop()
        self._ready = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_requested = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(
                        asyncio.gather(*pending, return_exceptions=True)
                    )
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; a future for its result (cancel it to cancel ``coro``)."""
        if not self.running:
            coro.close()
            raise RuntimeError("the event loop thread is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result.

        Raises ``RuntimeError`` if called on the loop's own thread (it would deadlock). On
        ``timeout`` or ``KeyboardInterrupt`` the coroutine is cancelled before the error is raised.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("LoopThread.run called from the loop's own thread; await instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop (cancelling what still runs on it) and join its thread."""
        with self._stop_lock:
            # One stop only: a second one would interrupt the shutdown of pending tasks.
            first = not self._stop_requested
            self._stop_requested = True
        if first and self._thread.is_alive() and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop_thread():
            self._thread.join(timeout)
