"""Readers for streamed bodies: an async reader, and a blocking file-like twin for threads.

A streamed argument reaches a method, and a streamed reply reaches a caller, as one of these.
Either never holds more than the flow-control window in memory, and either raises
:class:`StreamBrokenError` when the stream fails before its end, so a short read is never
mistaken for a complete one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import StreamBrokenError
from .wire import stream_trailer_error

if TYPE_CHECKING:
    from .connection import InboundStream

__all__ = ["StreamReader", "SyncStreamReader", "iterate_body"]

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
