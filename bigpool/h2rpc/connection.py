"""The asyncio side of an HTTP/2 connection: a thin layer that feeds ``h2`` and moves bytes.

``h2.connection.H2Connection`` is the protocol state machine (it does no I/O). This module
gives it a transport: received bytes go in, events come out and are routed to per-stream
buffers, and what h2 wants to send is written out once per batch of events. Two rules keep
memory bounded and links full:

* **Ack on read.** Received DATA is handed back to the peer's flow-control window only when
  the consumer reads it (:meth:`InboundStream.read_chunk`), so a slow reader slows the sender
  instead of piling up bytes.
* **Wait for window.** :meth:`H2Connection.send_data` cuts a body into frames no larger than
  the peer allows and waits for WINDOW_UPDATE (and for the transport to drain) when it must.

The client and server protocols subclass :class:`H2Connection` and add what happens on a new
request or response.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import struct
from collections.abc import Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hyperframe.frame
from h2.errors import ErrorCodes
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame, PushPromiseFrame

from .errors import ConnectionLostError, ProtocolError, StreamBrokenError
from .wire import Headers

# One stream may have this much unread data in flight: enough for one stream to fill a fast
# link (bandwidth x RTT on loopback or a LAN), small enough that a stalled reader holds little.
STREAM_WINDOW = 16 * 1024 * 1024
# All streams of a connection together: several full-speed streams at once.
CONNECTION_WINDOW = 64 * 1024 * 1024
# Credit for data read from a stream still open is handed to h2 in batches of this size (or
# when the stream ends): a long-lived stream of small records then costs no flow-control work
# per read. Far below half of STREAM_WINDOW, where h2 first sends a WINDOW_UPDATE, so the
# peer's windows never run lower for it.
ACK_BATCH_BYTES = 256 * 1024
# Larger frames mean fewer h2 events per byte; 1 MiB keeps per-frame buffering small.
MAX_FRAME_SIZE = 1024 * 1024
# Header blocks beyond this are refused: a bound on what a peer can make us decode and hold.
MAX_HEADER_LIST_SIZE = 64 * 1024
# A header block (HEADERS plus CONTINUATIONs) is held whole until decoded; refuse larger ones.
MAX_HEADER_BLOCK = 2 * MAX_HEADER_LIST_SIZE
# Frames at least this big are written out at once rather than batched with others.
EAGER_FLUSH_BYTES = 64 * 1024
# Most we hold unsent for a peer that keeps sending but does not read (each PING or SETTINGS it
# sends makes us owe it an ACK). Our DATA can never exceed the peer's flow-control window, so
# legitimate traffic stays far below this.
MAX_WRITE_BACKLOG = 2 * CONNECTION_WINDOW


def _data_frame_body_repr(self: hyperframe.frame.DataFrame) -> str:
    """The text hyperframe's ``repr`` gives a DATA frame's body, from the bytes it shows.

    h2 evaluates ``repr(frame)`` for every frame it receives (for a trace log that is a no-op
    unless a logger is configured), and hyperframe's fallback ``_body_repr`` serialises and
    hex-encodes the *whole* body only to keep its first 20 hex digits: two copies and a hex
    string twice the size of every received megabyte. This gives the same text in O(1); it
    was a third to a half of the CPU time of receiving a streamed body.
    """
    head = bytes(self.serialize_padding_data()) + bytes(self.data[:11])
    if len(head) < 11 and self.pad_length:
        head += bytes(min(self.pad_length, 11))
    head = head[:11]
    if not head:
        return "None"
    text = head.hex()
    if len(text) > 20:
        text = text[:20] + "..."
    return "<hex:" + text + ">"


hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


# A DATA frame whose payload is at least this big is handed to the transport as the payload
# object itself (see _H2Connection); smaller frames are serialised and coalesced.
ZERO_COPY_DATA_BYTES = 16 * 1024
# What one read from the transport may bring (asyncio's TLS layer reads up to 256 KiB).
READ_BUFFER_BYTES = 256 * 1024
_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA_FRAME_TYPE = 0x0
_END_STREAM_FLAG = 0x1
_PADDED_FLAG = 0x8
_log = logging.getLogger("bigpool.h2rpc")
_CONNECTION_OPEN = frozenset(
    {h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN}
)
# Stream states in which we may send DATA, and in which the peer may.
_STREAM_SENDING = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})
_STREAM_RECEIVING = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})


class _Slice:
    """A slice of a larger body, wrapped so that h2 keeps it as it is (h2 copies a
    ``memoryview`` with ``tobytes``); :meth:`_H2Connection._prepare_for_sending` unwraps it."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: Any) -> Any:
        return self.view[index]


class _H2Connection(h2.connection.H2Connection):
    """h2's state machine with an outbound buffer that does not copy large DATA payloads.

    h2 serialises every frame and appends it to one bytearray, which :meth:`data_to_send`
    copies out again: a megabyte of streamed body was copied four times before TLS saw it
    (``memoryview.tobytes`` in h2, ``serialize_body``, header + body, the bytearray, the
    ``bytes`` of it). Here an unpadded DATA frame with a large immutable payload is queued as
    its 9-byte header and the payload object itself, and :meth:`chunks_to_send` gives the
    queued pieces in order for ``transport.writelines``. Everything else (small frames, h2's
    own direct writes to ``_data_to_send``) still goes through the bytearray, coalesced.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self._chunks: list[bytes | memoryview] = []

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        for frame in frames:
            data: Any = getattr(frame, "data", None)
            if type(data) is _Slice:
                data = data.view  # only ever large and unpadded: see H2Connection.send_data
            if (
                type(frame) is hyperframe.frame.DataFrame
                and type(data) in (bytes, memoryview)
                and len(data) >= ZERO_COPY_DATA_BYTES
                and not frame.pad_length
                and "PADDED" not in frame.flags
            ):
                size = frame.body_len = len(data)
                if size > self.max_outbound_frame_size:  # as h2's own check
                    raise AssertionError(f"DATA frame of {size} bytes is too large")
                flags = _END_STREAM_FLAG if "END_STREAM" in frame.flags else 0
                self._data_to_send += _FRAME_HEADER.pack(
                    (size >> 8) & 0xFFFF, size & 0xFF, _DATA_FRAME_TYPE, flags,
                    frame.stream_id & 0x7FFFFFFF,
                )
                self._chunks.append(bytes(self._data_to_send))
                self._chunks.append(data)
                self._data_to_send = bytearray()
            else:
                self._data_to_send += frame.serialize()
                if frame.body_len > self.max_outbound_frame_size:
                    raise AssertionError(f"frame of {frame.body_len} bytes is too large")

    def send_data_now(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Queue ``data`` as one DATA frame without END_STREAM, if it may go now; else False.

        What ``send_data`` does for the common case, without its state-machine, frame-object
        and logging work (a third of a small reply's cost): allowed while the connection and
        the stream are open for sending and ``data`` fits the frame size and both flow-control
        windows, which are charged as h2 would charge them. ``False`` changes nothing; the
        caller then uses ``send_data``, which raises or waits as the case needs.
        """
        size = len(data)
        if not 0 < size <= self.max_outbound_frame_size or size > self.outbound_flow_control_window:
            return False
        if self.state_machine.state not in _CONNECTION_OPEN:
            return False
        stream = self.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _STREAM_SENDING:
            return False
        if size > stream.outbound_flow_control_window:
            return False
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += _FRAME_HEADER.pack(
            (size >> 8) & 0xFFFF, size & 0xFF, _DATA_FRAME_TYPE, 0, stream_id & 0x7FFFFFFF
        )
        if size >= ZERO_COPY_DATA_BYTES:
            self._chunks.append(bytes(self._data_to_send))
            self._chunks.append(data)
            self._data_to_send = bytearray()
        else:
            self._data_to_send += data
        return True

    def receive_data(self, data: Any) -> list[h2.events.Event]:
        # h2 sets the frame size limit after add_data; _BoundedFrameBuffer checks it there.
        self.incoming_buffer.max_frame_size = self.max_inbound_frame_size
        return super().receive_data(data)

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        # An unpadded DATA frame on an open stream, not its last: h2's own checks and window
        # accounting, without its state-machine passes and the repr() of every frame it logs.
        if type(frame) is hyperframe.frame.DataFrame and not frame.flags:
            stream = self.streams.get(frame.stream_id)
            if (stream is not None and stream.state_machine.state in _STREAM_RECEIVING
                    and self.state_machine.state in _CONNECTION_OPEN):
                data = frame.data
                size = len(data)
                self._inbound_flow_control_window_manager.window_consumed(size)
                stream._inbound_window_manager.window_consumed(size)
                stream._track_content_length(size, False)
                event = object.__new__(h2.events.DataReceived)
                event.stream_id = frame.stream_id
                event.data = data
                event.flow_controlled_length = size
                event.stream_ended = None
                return [event]
        return super()._receive_frame(frame)

    def _open_streams(self, remainder: int) -> int:
        # h2 calls this (through open_outbound/inbound_streams) for every new stream, to check
        # the concurrency limit: a scan of every stream held, two properties each. The same
        # scan, same result and same clean-up of closed streams, with the state read once.
        count = 0
        to_delete = []
        is_open = h2.stream.STREAM_OPEN
        closed = h2.stream.StreamState.CLOSED
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if is_open[state]:
                if stream_id % 2 == remainder:
                    count += 1
            elif state == closed:
                to_delete.append(stream_id)
        for stream_id in to_delete:
            stream = self.streams.pop(stream_id)
            self._closed_streams[stream_id] = stream.closed_by
        return count

    def chunks_to_send(self) -> list[bytes | memoryview]:
        """Everything queued to send, in order, as a list of byte strings (taken, not copied)."""
        chunks = self._chunks
        if self._data_to_send:
            chunks.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        self._chunks = []
        return chunks

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._chunks:
            self._data_to_send = bytearray(b"".join(self.chunks_to_send()))
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._chunks = []
        super().clear_outbound_data_buffer()


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=True,
        normalize_inbound_headers=False,
    )


class _BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, cutting frames off the bytes as they arrive, with bounds h2 lacks.

    h2 appends every read to one bytearray and slices each frame out of it: a received
    megabyte was copied three or four times (the append; the bytearray's reallocation, which
    copies what is left once its front is deleted; the slice; ``tobytes``). Here
    :meth:`add_data` cuts the frames itself. The payload of an unpadded DATA frame is gathered
    from each read straight into one buffer of exactly its size, which becomes the frame's
    ``data`` (a ``bytes``) with no further copy; one that arrives whole in a read is copied out
    once. Any other frame is gathered whole, then parsed as h2 parses it. The iterator gives
    the frames in the order they arrived and raises a frame's error where h2 would, after the
    frames before it (h2 then answers it with a GOAWAY); the buffer stays broken after that.

    Bounds: h2 checks a frame's length against the maximum frame size only once the whole
    frame has arrived, so a header announcing 16 MiB makes it buffer 16 MiB first; here the
    header alone is enough (``max_frame_size`` must be set before :meth:`add_data`, as
    :class:`_H2Connection` does). And h2 buffers a header block of up to 64 CONTINUATION
    frames of any size before decoding (and then refusing) it; here the block may not exceed
    ``MAX_HEADER_BLOCK``. Nothing keeps a view of the bytes given to :meth:`add_data` after it
    returns (they are the protocol's reused read buffer).
    """

    _block_size = 0

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        # Frames parsed and not yet taken, in order; an exception, if any, is last and stays.
        self._ready: collections.deque[Frame | Exception] = collections.deque()
        self._broken = False
        # The start (header first) of a frame that arrives in pieces and is not gathered.
        self._partial = bytearray()
        # The DATA frame whose payload is being gathered, the payload's buffer, its bytes
        # still missing.
        self._gathering: hyperframe.frame.DataFrame | None = None
        self._payload: io.BytesIO | None = None
        self._payload_view: memoryview | None = None
        self._missing = 0

    def add_data(self, data: Any) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if self._preamble_len:
            taken = min(self._preamble_len, len(view))
            super().add_data(view[:taken].tobytes())  # h2's check of the client's preamble
            view = view[taken:]
        pos = 0
        end = len(view)
        partial = self._partial
        while pos < end and not self._broken:
            if self._gathering is not None:
                pos = self._gather(view, pos, end)
            elif partial or end - pos < 9:
                if len(partial) < 9:
                    taken = min(9 - len(partial), end - pos)
                    partial += view[pos : pos + taken]
                    pos += taken
                    if len(partial) < 9:
                        break
                    started = self._start_frame(partial, 0)
                    if started is None:
                        break
                    if started:
                        partial.clear()
                        continue
                size = 9 + int.from_bytes(partial[:3], "big")
                taken = min(size - len(partial), end - pos)
                partial += view[pos : pos + taken]
                pos += taken
                if len(partial) == size:
                    self._take_frame(bytes(partial))
                    partial.clear()
            else:
                started = self._start_frame(view, pos)
                if started is None:
                    break
                if started:
                    pos += started
                else:
                    size = 9 + int.from_bytes(view[pos : pos + 3], "big")
                    if size <= end - pos:
                        self._take_frame(view[pos : pos + size].tobytes())
                        pos += size
                    else:
                        partial += view[pos:end]
                        pos = end

    def _start_frame(self, header: bytearray | memoryview, pos: int) -> int | None:
        """Check the frame header at ``header[pos:]`` and, for an unpadded DATA frame, take it:
        whole if it is all in ``header``, or start gathering its payload. How many bytes of
        ``header`` were taken (0 for any other frame), or None if the header is refused."""
        length_high, length_low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(header, pos)
        length: int = length_high << 8 | length_low
        try:
            self._validate_frame_length(length)
        except Exception as exc:
            self._fail(exc)
            return None
        stream_id &= 0x7FFFFFFF
        if kind != _DATA_FRAME_TYPE or flags & _PADDED_FLAG or not stream_id:
            return 0  # h2's parsing (a DATA frame on stream 0 is its protocol error)
        frame = hyperframe.frame.DataFrame(stream_id)
        frame.parse_flags(flags)
        frame.body_len = length
        start = pos + 9
        if start + length <= len(header):
            frame.data = bytes(header[start : start + length])
            self._ready.append(frame)
            return 9 + length
        self._gathering = frame
        # bytes() is zeroed by calloc; the BytesIO then holds the only reference, so its
        # getbuffer() writes into that bytes object in place and getvalue() returns it.
        self._payload = io.BytesIO(bytes(length))
        self._payload_view = self._payload.getbuffer()
        self._missing = length
        return 9

    def _gather(self, view: memoryview, pos: int, end: int) -> int:
        """Copy what ``view[pos:end]`` holds of the payload being gathered; where it stopped."""
        payload_view = self._payload_view
        assert payload_view is not None and self._payload is not None
        taken = min(self._missing, end - pos)
        filled = len(payload_view) - self._missing
        payload_view[filled : filled + taken] = view[pos : pos + taken]
        self._missing -= taken
        if not self._missing:
            payload_view.release()  # getvalue() copies while a view is out
            frame = self._gathering
            assert frame is not None
            frame.data = self._payload.getvalue()
            self._ready.append(frame)
            self._gathering = self._payload = self._payload_view = None
        return pos + taken

    def _take_frame(self, raw: bytes) -> None:
        """Parse the whole frame ``raw`` as h2 does; queue it, or the error h2 would raise."""
        try:
            try:
                frame, length = Frame.parse_frame_header(memoryview(raw)[:9])
            except (InvalidDataError, InvalidFrameError) as exc:
                raise h2.exceptions.ProtocolError(
                    f"Received frame with invalid header: {exc!s}"
                ) from exc
            try:
                frame.parse_body(memoryview(raw)[9 : 9 + length])
            except InvalidDataError as exc:
                raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from exc
            except InvalidFrameError as exc:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from exc
        except Exception as exc:  # InvalidPaddingError too: h2's receive_data handles it
            self._fail(exc)
        else:
            self._ready.append(frame)

    def _fail(self, exc: Exception) -> None:
        if not self._broken:
            self._broken = True
            self._ready.append(exc)

    def __next__(self) -> Frame:
        ready = self._ready
        while ready:
            item = ready[0]
            if isinstance(item, Exception):
                raise item
            ready.popleft()
            frame = self._update_header_buffer(item)
            if frame is not None:
                return frame
        raise StopIteration

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, HeadersFrame | PushPromiseFrame | ContinuationFrame):
            start = 0 if not isinstance(f, ContinuationFrame) else self._block_size
            self._block_size = start + len(f.data)
            if self._block_size > MAX_HEADER_BLOCK:
                raise h2.exceptions.DenialOfServiceError(
                    f"header block exceeds {MAX_HEADER_BLOCK} bytes"
                )
        return super()._update_header_buffer(f)


class InboundStream:
    """The receiving half of one HTTP/2 stream: its headers, body chunks and trailers.

    Body chunks queue here as they arrive; :meth:`read_chunk` hands them out and returns their
    flow-control credit to the peer. A stream that is reset, or whose connection is lost, makes
    readers raise the error it failed with.
    """

    __slots__ = (
        "_chunks",
        "_waiter",
        "conn",
        "ended",
        "error",
        "headers",
        "id",
        "listener",
        "local_closed",
        "reset_code",
        "trailers",
    )

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers: Headers | None = None
        self.trailers: Headers | None = None
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self.ended = False
        self.local_closed = False
        self.reset_code: int | None = None
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Called (on the loop, synchronously) whenever something new arrives; see StreamReader.
        self.listener: Callable[[], None] | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        self.notify()

    def notify(self) -> None:
        """Call the listener, if any (what it raises is logged, not propagated)."""
        listener = self.listener
        if listener is not None:
            try:
                listener()
            except Exception:
                _log.exception("a stream listener failed")

    def has_news(self) -> bool:
        """Whether a reader would find something now: a chunk, the end or a failure."""
        return bool(self._chunks) or self.ended or self.error is not None

    def feed(self, data: bytes, flow_controlled_length: int) -> None:
        if self.error is not None:
            self.conn.ack(self.id, flow_controlled_length)
            return
        self._chunks.append((data, flow_controlled_length))
        self._wake()

    def end(self) -> None:
        self.ended = True
        self.conn.settle_acks(self.id)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not (self.ended and not self._chunks):
            self.error = exc
        self.conn.settle_acks(self.id)
        self._wake()

    @property
    def finished(self) -> bool:
        """True once nothing more can arrive: ended, reset or disconnected."""
        return self.ended or self.error is not None

    async def wait(self) -> None:
        """Wait until something new happens on the stream (headers, data, end, failure)."""
        await self.changed()

    def changed(self) -> asyncio.Future[None]:
        """A future done when something new happens on the stream (see :meth:`wait`)."""
        if self._waiter is None:
            self._waiter = self.conn.loop.create_future()
        return self._waiter

    async def wait_headers(self) -> Headers:
        while self.headers is None:
            if self.error is not None:
                raise self.error
            await self.wait()
        return self.headers

    async def read_chunk(self) -> bytes:
        """The next chunk of the body, or ``b""`` once the body has ended.

        Raises the stream's error if it failed before its end.
        """
        while (chunk := self.read_chunk_nowait()) is None:
            await self.wait()
        return chunk

    def read_chunk_nowait(self) -> bytes | None:
        """The next chunk if one has arrived, ``b""`` once the body has ended, else ``None``.

        Raises the stream's error if it failed before its end.
        """
        while self._chunks:
            data, length = self._chunks.popleft()
            self.conn.ack(self.id, length)
            if data:
                return data
        if self.error is not None:
            raise self.error
        if self.ended:
            return b""
        return None

    async def read_all(self, limit: int) -> bytes:
        """The whole body; :class:`ProtocolError` if it exceeds ``limit`` bytes."""
        parts = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"message body exceeds the limit of {limit} bytes")
            parts.append(chunk)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def discard(self) -> None:
        """Drop unread data, returning its flow-control credit so other streams can use it."""
        while self._chunks:
            _, length = self._chunks.popleft()
            self.conn.ack(self.id, length)


class H2Connection(asyncio.BufferedProtocol):
    """An HTTP/2 connection over an asyncio transport; subclasses handle stream events.

    A buffered protocol: the transport (TLS included) decrypts or reads straight into one
    reused buffer, rather than into a new ``bytes`` object per read that is then joined.
    """

    def __init__(self, *, client_side: bool, max_concurrent_streams: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.h2 = _H2Connection(h2_config(client_side))
        self.h2.incoming_buffer = _BoundedFrameBuffer(server=not client_side)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, InboundStream] = {}
        self.closed: BaseException | None = None
        self._max_concurrent_streams = max_concurrent_streams
        self._flush_handle: asyncio.Handle | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._unacked: dict[int, int] = {}  # stream id -> credit held back (see ack)
        self.closed_event = asyncio.Event()
        self.peer: Any = None
        self._read_view = memoryview(bytearray(READ_BUFFER_BYTES))

    # asyncio.Protocol -------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _stream_transport(transport)
        self.peer = transport.get_extra_info("peername")
        self.h2.local_settings = h2.settings.Settings(
            client=self.h2.config.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Settings given as initial values are in force at once (not on the peer's ACK), so
        # what follows from them must be set by hand too.
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._write_paused and self._backlog_exceeded():
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush()  # h2 has queued a GOAWAY naming the error: close after it goes out
            if self.closed is None:
                self.closed = ProtocolError(f"peer broke HTTP/2: {exc}")
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self.handle_event(event)
        self.flush()

    def _backlog_exceeded(self) -> bool:
        transport = self.transport
        if transport is None or transport.get_write_buffer_size() <= MAX_WRITE_BACKLOG:
            return False
        if self.closed is None:
            self.closed = ProtocolError(f"{self.peer_name} sends but does not read; dropped")
        transport.abort()  # close() would wait for the unread backlog to drain
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            reason = f"connection to {self.peer_name} lost" + (f": {exc}" if exc else "")
            self.closed = ConnectionLostError(reason)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for stream in list(self.streams.values()):
            stream.fail(self.closed)
        for waiter in [*self._drain_waiters, *self._window_waiters.values()]:
            if not waiter.done():
                waiter.set_exception(self.closed)
                waiter.exception()  # retrieved: a sender may already be gone
        self._drain_waiters.clear()
        self._window_waiters.clear()
        self.closed_event.set()
        self.on_closed()

    # events --------------------------------------------------------------------------------

    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.feed(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_opened(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.end()
                self._maybe_forget(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            self._window_opened(event.stream_id)
            if stream is not None:
                self.stream_reset(stream, event.error_code)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._window_opened(0)
            self.settings_changed()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.connection_terminated(event)

    def stream_reset(self, stream: InboundStream, error_code: int | None) -> None:
        stream.reset_code = error_code
        # After the peer's END_STREAM its body is complete: a reset then (as when a server
        # replies before reading the whole request) only stops our sending, loses nothing.
        if not stream.ended:
            stream.fail(StreamBrokenError(f"stream reset by peer ({_error_name(error_code)})"))
        self.stream_closed(stream)

    def connection_terminated(self, event: h2.events.ConnectionTerminated) -> None:
        self.closed = ConnectionLostError(
            f"{self.peer_name} closed the connection ({_error_name(event.error_code)})"
        )
        if self.transport is not None:
            self.transport.close()

    def settings_changed(self) -> None:
        """Hook: the peer changed its settings (a client may now open more streams)."""

    def stream_closed(self, stream: InboundStream) -> None:
        """Hook: ``stream`` is closed in both directions and forgotten."""

    def on_closed(self) -> None:
        """Hook: the connection is gone."""

    # sending ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write out everything h2 has queued."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        chunks = self.h2.chunks_to_send()
        if chunks and self.transport is not None and not self.transport.is_closing():
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:
                self.transport.writelines(chunks)

    def schedule_flush(self) -> None:
        """Write out what h2 has queued after the current batch of work (one write, not many)."""
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def ack(self, stream_id: int, length: int) -> None:
        """Return ``length`` bytes of flow-control credit for data the consumer has read.

        On a stream the peer may still send on, credit is held back until it adds up to
        :data:`ACK_BATCH_BYTES` or the stream ends, fails or is reset (:meth:`settle_acks`).
        """
        if not length or self.closed is not None:
            return
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.finished:
            unacked = self._unacked
            held = unacked.get(stream_id, 0) + length
            if held < ACK_BATCH_BYTES:
                unacked[stream_id] = held
                return
            unacked.pop(stream_id, None)
            length = held
        elif self._unacked:
            length += self._unacked.pop(stream_id, 0)
        self._ack_now(stream_id, length)

    def settle_acks(self, stream_id: int) -> None:
        """Hand h2 the credit held back for ``stream_id`` (it has ended or failed)."""
        held = self._unacked.pop(stream_id, 0) if self._unacked else 0
        if held and self.closed is None:
            self._ack_now(stream_id, held)

    def _ack_now(self, stream_id: int, length: int) -> None:
        h2_conn = self.h2
        h2_conn.acknowledge_received_data(length, stream_id)
        if h2_conn._data_to_send or h2_conn._chunks:  # a WINDOW_UPDATE is due
            self.schedule_flush()

    def send_headers(self, stream_id: int, headers: Headers, *, end_stream: bool = False) -> None:
        self._check_open()
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        if end_stream:
            self._local_end(stream_id)
        self.schedule_flush()

    async def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool
    ) -> None:
        """Send a body (or part of one), waiting for flow-control window as needed."""
        view = memoryview(data)
        total = len(view)
        sent = 0
        while True:
            self._check_open()
            if self._write_paused:
                await self._drain()
                continue
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError:
                raise StreamBrokenError(f"stream {stream_id} was closed by the peer") from None
            size = min(window, self.h2.max_outbound_frame_size, total - sent)
            if size <= 0 and sent < total:
                if stream_id not in self.streams:
                    # Reset (and forgotten): h2 may still report its window, which never opens.
                    raise StreamBrokenError(f"stream {stream_id} was reset")
                await self._wait_window(stream_id)
                continue
            last = end_stream and sent + size == total
            raw: bytes | memoryview = (
                data if size == total and type(data) is bytes else view[sent : sent + size]
            )
            if last or not self.h2.send_data_now(stream_id, raw):
                # A large slice goes to h2 wrapped, so h2 does not copy it (see _Slice); a
                # small one as a memoryview, which h2 copies.
                piece: Any = raw
                if type(raw) is memoryview and size >= ZERO_COPY_DATA_BYTES:
                    piece = _Slice(raw)
                try:
                    self.h2.send_data(stream_id, piece, end_stream=last)
                except h2.exceptions.StreamClosedError:
                    raise StreamBrokenError(f"stream {stream_id} was closed by the peer") from None
            sent += size
            if size >= EAGER_FLUSH_BYTES:
                self.flush()
            else:
                self.schedule_flush()
            if sent >= total:
                break
        if end_stream:
            self._local_end(stream_id)

    def send_data_nowait(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Send what of ``data`` may go at once (flow-control window, an unpaused transport);
        how many bytes, from the start, were taken. Never waits and never ends the stream.

        The bytes are written to the transport at the next :meth:`flush`, which is scheduled
        for the end of this turn of the event loop (a caller with a batch to send calls
        ``flush`` itself when done). Raises the connection's error once it is closed.
        """
        self._check_open()
        if self._write_paused:
            return 0
        total = len(data)
        if total and type(data) is bytes and self.h2.send_data_now(stream_id, data):
            sent = total
        else:
            view = memoryview(data).cast("B")
            sent = 0
            limit = self.h2.max_outbound_frame_size
            while sent < total and self.h2.send_data_now(
                stream_id, view[sent : sent + min(limit, total - sent)]
            ):
                sent += min(limit, total - sent)
        if sent:
            self.schedule_flush()
        return sent

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        """Close our half of the stream, with trailers if given."""
        self._check_open()
        try:
            if trailers:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            raise StreamBrokenError(f"stream {stream_id} was closed by the peer") from None
        self._local_end(stream_id)
        self.schedule_flush()

    def reset_stream(self, stream_id: int, error_code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abandon a stream: tell the peer, drop its unread data. Safe to call more than once."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.fail(StreamBrokenError(f"stream {stream_id} was reset"))
            stream.discard()
            self.stream_closed(stream)
        if self.closed is None:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream_id, error_code)
            self.schedule_flush()
        self._window_opened(stream_id)

    def abort(self, exc: BaseException) -> None:
        """Close the connection at once, failing every stream with ``exc``.

        No goodbye and no TLS close: a peer that is unreachable would never answer them, and
        the streams would wait for the TLS shutdown timeout (30 s) to fail.
        """
        if self.closed is None:
            self.closed = exc
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Say goodbye (GOAWAY) and close the transport."""
        if self.closed is None:
            self.closed = ConnectionLostError(f"connection to {self.peer_name} closed")
            try:
                self.h2.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
        if self.transport is not None:
            self.transport.close()

    @property
    def peer_name(self) -> str:
        if isinstance(self.peer, tuple) and len(self.peer) >= 2:
            return f"{self.peer[0]}:{self.peer[1]}"
        return str(self.peer)

    # internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed is not None:
            raise self.closed

    def _local_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.local_closed = True
            self._maybe_forget(stream)

    def _maybe_forget(self, stream: InboundStream) -> None:
        if stream.local_closed and stream.ended and self.streams.pop(stream.id, None) is not None:
            self.stream_closed(stream)

    async def _drain(self) -> None:
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def _wait_window(self, stream_id: int) -> None:
        waiter = self.loop.create_future()
        self._window_waiters[stream_id] = waiter
        try:
            await waiter
        finally:
            if self._window_waiters.get(stream_id) is waiter:
                del self._window_waiters[stream_id]

    def _window_opened(self, stream_id: int) -> None:
        if stream_id == 0:
            waiters = list(self._window_waiters.values())
            self._window_waiters.clear()
        else:
            waiter = self._window_waiters.pop(stream_id, None)
            waiters = [waiter] if waiter is not None else []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


# What H2Connection calls on its transport.
_TRANSPORT_METHODS = (
    "write", "writelines", "close", "abort", "is_closing", "get_extra_info",
    "get_write_buffer_size",
)


def _stream_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """``transport`` as the stream transport it is, checked by what it can do.

    Not ``isinstance(transport, asyncio.Transport)``: uvloop's transports (``TCPTransport``,
    its TLS ``_SSLProtocolTransport``) implement the interface without deriving from, or
    registering with, asyncio's classes.
    """
    missing = [name for name in _TRANSPORT_METHODS if not callable(getattr(transport, name, None))]
    if missing:
        raise TypeError(
            f"{type(transport).__name__} is not a stream transport (no {', '.join(missing)})"
        )
    return cast(asyncio.Transport, transport)


def _error_name(code: int | None) -> str:
    if code is None:
        return "no error code"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"
