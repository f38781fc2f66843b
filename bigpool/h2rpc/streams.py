"""Readers for streamed bodies: an async reader, and a blocking file-like twin for threads.

A streamed argument reaches a method, and a streamed reply reaches a caller, as one of these.
Either never holds more than the flow-control window in memory, and either raises
:class:`StreamBrokenError` when the stream fails before its end, so a short read is never
mistaken for a complete one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import io
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import StreamBrokenError
from .wire import stream_trailer_error

if TYPE_CHECKING:
    from .connection import H2Connection, InboundStream

__all__ = ["StreamReader", "StreamWriter", "SyncStreamReader", "iterate_body"]

# Chunk size when reading a file-like body: one h2 frame's worth.
STREAM_CHUNK = 1024 * 1024


class StreamReader:
    """An async reader of a streamed body.

    ``async for chunk in reader`` gives the body chunk by chunk as it arrives; ``await
    reader.read(n)`` gives up to ``n`` bytes (all that remain when ``n`` is negative).
    Closing the reader before the end abandons the stream (the sender sees it reset).
    """

    def __init__(self, stream: InboundStream, description: str = "stream") -> None:
        self._stream = stream
        self._description = description
        self._buffer = b""
        self._offset = 0
        self._done = False
        self._closed = False
        self.bytes_read = 0

    def __repr__(self) -> str:
        return f"<StreamReader {self._description} read={self.bytes_read}>"

    @property
    def at_eof(self) -> bool:
        return self._done and self._offset >= len(self._buffer)

    async def read_chunk(self) -> bytes:
        """The next chunk as it arrived, or ``b""`` at the end of a complete stream."""
        while (chunk := self.read_chunk_nowait()) is None:
            await self._stream.wait()
        return chunk

    def read_chunk_nowait(self) -> bytes | None:
        """The next chunk if one has arrived, ``b""`` at the end of a complete stream, or
        ``None`` when nothing has arrived yet (see :meth:`on_arrival`)."""
        if self._offset < len(self._buffer):
            rest = self._buffer[self._offset :]
            self._buffer, self._offset = b"", 0
            return rest
        if self._done:
            return b""
        if self._closed:
            raise ValueError("read from a closed StreamReader")
        try:
            chunk = self._stream.read_chunk_nowait()
        except Exception as exc:
            raise self._broken(exc) from exc
        if chunk is None:
            return None
        if not chunk:
            self._done = True
            error = stream_trailer_error(self._stream.trailers)
            if error is not None:
                raise StreamBrokenError(
                    f"{self._description} failed after {self.bytes_read} bytes: "
                    f"{type(error).__name__}: {error}"
                ) from error
            return b""
        self.bytes_read += len(chunk)
        return chunk

    def _broken(self, exc: Exception) -> StreamBrokenError:
        return StreamBrokenError(f"{self._description} broke after {self.bytes_read} bytes: {exc}")

    def on_arrival(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` on the event loop, at once, whenever data, the end or a failure
        arrives (``None`` stops it); it reads with :meth:`read_chunk_nowait`.

        For a consumer that must not wait a turn of the event loop per chunk. If something has
        already arrived, ``callback`` is also called soon after this. The callback should not
        raise: what it raises is logged and dropped.
        """
        stream = self._stream
        stream.listener = callback
        if callback is not None and (self._offset < len(self._buffer) or stream.has_news()):
            stream.conn.loop.call_soon(stream.notify)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (fewer only at the end), or everything left when ``n < 0``."""
        if n < 0:
            parts = []
            while chunk := await self.read_chunk():
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        if self._offset >= len(self._buffer):
            chunk = await self.read_chunk()
            if not chunk:
                return b""
            self._buffer, self._offset = chunk, 0
        end = self._offset + n
        data = self._buffer[self._offset : end]
        self._offset = min(end, len(self._buffer))
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    def close(self) -> None:
        """Stop reading; an unfinished stream is reset so the sender stops too."""
        if self._closed:
            return
        self._closed = True
        stream = self._stream
        if not (self._done and stream.finished):
            stream.conn.reset_stream(stream.id)
        stream.discard()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> StreamReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A reader dropped unread must not hold its connection's flow-control window forever.
        if not self._closed and not self._done:
            with contextlib.suppress(RuntimeError):
                self._stream.conn.loop.call_soon_threadsafe(self.close)


class StreamWriter:
    """A streamed body its producer pushes, on the event loop, without awaiting.

    Give one as a call's argument (:meth:`Client.call`) or return one from an async service
    method. Once the call's stream is open, each :meth:`write` goes out at once as far as the
    peer's flow-control window allows: the bytes reach the transport at the end of the loop's
    turn, or at :meth:`flush` (call it after a batch of writes made outside the connection's
    own callbacks, to send them now and together). What cannot go at once waits here, in
    order (``buffered`` bytes), and follows as the window opens; a producer with no bound of
    its own should ``await`` :meth:`drain`. Writes made before the stream opens wait too.

    :meth:`close` ends the body after everything written. If the stream fails (reset, the
    connection lost, the peer answering before the body ended), ``failed`` holds the error,
    later writes are dropped, and the call that carries the body raises or returns as it would
    for any streamed body. Writes are of bytes-like objects, which must not change until sent.
    """

    def __init__(self) -> None:
        self._conn: H2Connection | None = None
        self._stream_id = 0
        self._pending: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self.buffered = 0
        self._sending = False
        self._closed = False
        self.failed: BaseException | None = None
        self.aborted: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        state = "failed" if self.failed else "closed" if self._closed else "open"
        return f"<StreamWriter {state} buffered={self.buffered}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` after what was written before (see the class docstring).

        Raises ``ValueError`` after :meth:`close` and ``TypeError`` for anything but bytes.
        """
        if self._closed:
            raise ValueError("write to a closed StreamWriter")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"a StreamWriter takes bytes, not {type(data).__name__}")
        if self.failed is not None or not data:
            return
        conn = self._conn
        if conn is not None and not self._pending and not self._sending:
            try:
                sent = conn.send_data_nowait(self._stream_id, data)
            except Exception as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            if sent:
                data = memoryview(data).cast("B")[sent:]
        self._pending.append(data)
        self.buffered += len(data)
        self._wake()

    def flush(self) -> None:
        """Write what has been sent to the transport now, not at the end of the loop's turn."""
        conn = self._conn
        if conn is not None and self.failed is None:
            conn.flush()

    def close(self) -> None:
        """End the body once everything written has been sent. Idempotent."""
        self._closed = True
        self._wake()

    def abort(self, exc: BaseException) -> None:
        """End the body with an error, dropping what is not yet sent: a streamed reply ends
        with ``exc`` in its trailers (its reader raises :class:`StreamBrokenError` from it);
        a streamed argument's call raises ``exc``."""
        if not self._closed:
            self.aborted = exc
            self._closed = True
            self._pending.clear()
            self.buffered = 0
            self._release_drainers()
            self._wake()

    async def drain(self, low_water: int = 0) -> None:
        """Wait until at most ``low_water`` bytes wait to be sent (or the stream failed)."""
        while self.buffered > low_water and self.failed is None:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake(self) -> None:
        waiter = self._wakeup
        if waiter is not None:
            self._wakeup = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
        self._pending.clear()
        self.buffered = 0
        self._release_drainers()

    def _release_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def send_on(self, conn: H2Connection, stream_id: int,
                      stream: InboundStream | None = None) -> None:
        """Send the body on ``stream_id`` until it is closed and sent (for the client and
        server, once each). ``stream``, the call's receiving half, ends it early when it
        fails or ends. Raises what failed the sending; does not end the HTTP/2 stream."""
        if self._conn is not None:
            raise RuntimeError("a StreamWriter carries one body only")
        self._conn = conn
        self._stream_id = stream_id
        loop = conn.loop
        watched: asyncio.Future[None] | None = None
        try:
            while True:
                while self._pending:
                    data = self._pending.popleft()
                    self._sending = True
                    try:
                        await conn.send_data(stream_id, data, end_stream=False)
                    finally:
                        self._sending = False
                    self.buffered -= len(data)
                    if self.buffered == 0 or self._drain_waiters:
                        self._release_drainers()
                if self.failed is not None:
                    raise self.failed
                if self._closed:
                    return
                if stream is not None and stream.finished:
                    raise stream.error or StreamBrokenError("the peer ended the call first")
                waiter = self._wakeup = loop.create_future()
                if stream is not None:
                    changed = stream.changed()
                    if changed is not watched:  # one callback per stream event, not per wait
                        watched = changed
                        changed.add_done_callback(lambda _: self._wake())
                await waiter
        except BaseException as exc:
            self._fail(exc)
            raise


class SyncStreamReader(io.RawIOBase):
    """A blocking, file-like reader over a :class:`StreamReader` whose loop runs elsewhere.

    For code on other threads than the event loop's: thread-run service methods reading a
    streamed argument, and synchronous callers reading a streamed reply. Supports ``read``,
    ``readinto``, iteration by chunk (:meth:`iter_chunks`) and ``with``.
    """

    def __init__(self, reader: StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._reader = reader
        self._loop = loop

    def __repr__(self) -> str:
        return f"<SyncStreamReader {self._reader!r}>"

    def _run(self, coro: object) -> bytes:
        future: concurrent.futures.Future[bytes] = asyncio.run_coroutine_threadsafe(
            coro,  # type: ignore[arg-type]
            self._loop,
        )
        return future.result()

    def readable(self) -> bool:
        return True

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed stream")
        return self._run(self._reader.read(-1 if size is None else size))

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read_chunk(self) -> bytes:
        """The next chunk as it arrived, ``b""`` at the end."""
        return self._run(self._reader.read_chunk())

    def iter_chunks(self) -> Iterator[bytes]:
        while chunk := self.read_chunk():
            yield chunk

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._reader.close)
        super().close()


async def iterate_body(
    body: Any, executor: concurrent.futures.Executor, chunk_size: int = STREAM_CHUNK
) -> AsyncIterator[bytes | bytearray | memoryview]:
    """The chunks of a streamed body: a file-like, an iterator or an async iterator of bytes.

    Blocking sources (files, plain iterators) are read in ``executor`` so the loop stays free.
    """
    loop = asyncio.get_running_loop()
    if isinstance(body, StreamReader):
        async for chunk in body:
            yield chunk
        return
    if hasattr(body, "__anext__"):
        async for chunk in body:
            yield _check_bytes(chunk)
        return
    if hasattr(body, "read"):
        read = body.read
        while True:
            chunk = await loop.run_in_executor(executor, read, chunk_size)
            if not chunk:
                return
            yield _check_bytes(chunk)
    iterator: Iterator[Any] = iter(body)
    done = object()
    while True:
        chunk = await loop.run_in_executor(executor, _next_or, iterator, done)
        if chunk is done:
            return
        yield _check_bytes(chunk)


def _next_or(iterator: Iterator[Any], default: object) -> Any:
    return next(iterator, default)


def _check_bytes(chunk: Any) -> bytes | bytearray | memoryview:
    if isinstance(chunk, bytes | bytearray | memoryview):
        return chunk
    raise TypeError(f"a streamed body must yield bytes, not {type(chunk).__name__}")
