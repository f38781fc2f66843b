"""An asyncio event loop on a background thread, for synchronous callers.

bigpool's public API is synchronous, as the standard library's pools are; the RPC machinery is
asyncio. :class:`LoopThread` joins the two: coroutines are submitted from any thread and their
results waited for, and cancelling the returned future cancels the coroutine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """Runs an event loop on a daemon thread until :meth:`close`."""

    def __init__(self, name: str = "bigpool-loop") -> None:
        self.loop = asyncio.new_event_loop()
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
