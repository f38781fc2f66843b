"""The frame buffer that cuts received frames itself gives what h2's own buffer gives.

Sans-IO: bytes are fed to ``_BoundedFrameBuffer`` (and, for comparison, to h2's
``FrameBuffer``) in pieces cut at every boundary, through one reused buffer that is scribbled
over after each feed, as the protocol's read buffer is.
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import pytest
from hostile_helpers import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import Frame

from bigpool.h2rpc.connection import (
    CONNECTION_WINDOW,
    MAX_FRAME_SIZE,
    MAX_HEADER_BLOCK,
    STREAM_WINDOW,
    _BoundedFrameBuffer,
    _H2Connection,
    h2_config,
)

PADDED = 0x8


def padded(payload: bytes, pad: int) -> bytes:
    return bytes([pad]) + payload + bytes(pad)


def mixed_frames(big: int) -> bytes:
    """Every kind of frame the buffer treats differently, one after another."""
    return b"".join([
        frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\xff\xff"),
        frame(HEADERS, 0, 1, b"\x82\x84"),
        frame(CONTINUATION, END_HEADERS, 1, b"\x86"),
        frame(DATA, 0, 1, os.urandom(big)),
        frame(DATA, 0, 1, b""),
        frame(PING, 0, 0, b"pingpong"),
        frame(DATA, PADDED, 3, padded(os.urandom(100), 7)),
        frame(DATA, 0, 3, os.urandom(1)),
        frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big")),
        frame(0x20, 0x3, 5, b"an extension frame"),
        frame(DATA, PADDED | END_STREAM, 1, padded(b"", 0)),
        frame(DATA, END_STREAM, 3, os.urandom(big // 2)),
        frame(RST_STREAM, 0, 5, (8).to_bytes(4, "big")),
        frame(DATA, END_STREAM, 7, b""),
        frame(GOAWAY, 0, 0, bytes(8) + b"bye"),
        frame(SETTINGS, 0x1, 0, b""),
    ])


def describe(f: Frame) -> tuple[Any, ...]:
    data = getattr(f, "data", None)
    return (type(f), f.stream_id, sorted(f.flags), f.body_len, repr(f), f.serialize(),
            type(data) if data is not None else None)


class Feeder:
    """Feeds a buffer as the protocol does: each piece through one reused read buffer."""

    def __init__(self, buffer: h2.frame_buffer.FrameBuffer, max_frame_size: int) -> None:
        self.buffer = buffer
        self.buffer.max_frame_size = max_frame_size
        self.read_buffer = bytearray(len(PREFACE) + 2 * max_frame_size + 64)
        self.frames: list[tuple[Any, ...]] = []

    def feed(self, piece: bytes) -> None:
        view = memoryview(self.read_buffer)
        view[: len(piece)] = piece
        self.buffer.add_data(view[: len(piece)])
        view[: len(piece)] = b"\xee" * len(piece)  # what the next read would do to it
        for f in self.buffer:
            self.frames.append(describe(f))


def feed_in_pieces(buffer: h2.frame_buffer.FrameBuffer, data: bytes, cuts: list[int],
                   max_frame_size: int = MAX_FRAME_SIZE) -> list[tuple[Any, ...]]:
    feeder = Feeder(buffer, max_frame_size)
    bounds = [0, *sorted(cuts), len(data)]
    for start, stop in itertools.pairwise(bounds):
        feeder.feed(data[start:stop])
    return feeder.frames


def test_every_split_gives_what_h2_gives() -> None:
    data = mixed_frames(big=40)
    want = feed_in_pieces(h2.frame_buffer.FrameBuffer(), data, [])
    assert len(want) == 15  # the CONTINUATION is folded into its HEADERS
    for cut in range(len(data) + 1):
        assert feed_in_pieces(_BoundedFrameBuffer(), data, [cut]) == want, cut
    for cut in range(0, len(data) - 1, 3):
        assert feed_in_pieces(_BoundedFrameBuffer(), data, [cut, cut + 1, cut + 2]) == want


def test_byte_by_byte_and_random_pieces_give_what_h2_gives() -> None:
    rng = random.Random(7)
    data = PREFACE + mixed_frames(big=300_000)
    want = feed_in_pieces(h2.frame_buffer.FrameBuffer(server=True), data, [])
    small = PREFACE + mixed_frames(big=50)
    assert feed_in_pieces(_BoundedFrameBuffer(server=True), small, list(range(len(small)))) \
        == feed_in_pieces(h2.frame_buffer.FrameBuffer(server=True), small, [])
    for _ in range(30):
        cuts = [rng.randrange(len(data)) for _ in range(rng.randrange(1, 40))]
        assert feed_in_pieces(_BoundedFrameBuffer(server=True), data, cuts) == want


def test_a_full_size_data_frame_across_reads_is_bytes_of_its_payload() -> None:
    payload = os.urandom(MAX_FRAME_SIZE)
    data = frame(DATA, 0, 1, payload) + frame(DATA, END_STREAM, 1, payload[:10])
    for piece in (256 * 1024, 100_000, MAX_FRAME_SIZE + 9):
        frames = _frames_of(data, piece)
        assert [type(f.data) for f in frames] == [bytes, bytes]
        assert frames[0].data == payload and frames[1].data == payload[:10]
        assert not frames[0].flags and "END_STREAM" in frames[1].flags


def _frames_of(data: bytes, piece: int) -> list[Frame]:
    buffer = _BoundedFrameBuffer()
    buffer.max_frame_size = MAX_FRAME_SIZE
    read_buffer = bytearray(piece)
    out: list[Frame] = []
    for start in range(0, len(data), piece):
        chunk = data[start : start + piece]
        read_buffer[: len(chunk)] = chunk
        with memoryview(read_buffer) as view:
            buffer.add_data(view[: len(chunk)])
        read_buffer[:] = bytes(len(read_buffer))
        out += buffer
    return out


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    for ftype in (DATA, HEADERS, PING):
        buffer = _BoundedFrameBuffer()
        buffer.max_frame_size = MAX_FRAME_SIZE
        buffer.add_data(frame(PING, 0, 0, b"12345678") + frame(ftype, 0, 1, b"",
                                                                 length=MAX_FRAME_SIZE + 1))
        assert describe(next(buffer))[0].__name__ == "PingFrame"
        with pytest.raises(h2.exceptions.FrameTooLargeError):
            next(buffer)
        buffer.add_data(bytes(1000))
        with pytest.raises(h2.exceptions.FrameTooLargeError):  # and stays broken
            next(buffer)


def test_the_length_limit_is_the_buffers_max_frame_size() -> None:
    data = frame(DATA, 0, 1, bytes(100))
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        feed_in_pieces(_BoundedFrameBuffer(), data, [5], max_frame_size=99)
    assert len(feed_in_pieces(_BoundedFrameBuffer(), data, [5], max_frame_size=100)) == 1


@pytest.mark.parametrize("bad, error", [
    (frame(DATA, 0, 0, b"on stream zero"), h2.exceptions.ProtocolError),
    (frame(DATA, PADDED, 1, b"\x20short"), InvalidPaddingError),
    (frame(DATA, PADDED, 1, b""), h2.exceptions.FrameDataMissingError),
    (frame(PING, 0, 0, b"short"), h2.exceptions.ProtocolError),
])
def test_a_bad_frame_raises_what_h2_raises_after_the_frames_before_it(
    bad: bytes, error: type[Exception]
) -> None:
    data = frame(PING, 0, 0, b"12345678") + bad + frame(PING, 0, 0, b"87654321")
    for buffer_type in (h2.frame_buffer.FrameBuffer, _BoundedFrameBuffer):
        for cut in range(len(data) + 1):
            buffer = buffer_type()
            feeder = Feeder(buffer, MAX_FRAME_SIZE)
            with pytest.raises(error):
                feeder.feed(data[:cut])
                feeder.feed(data[cut:])
            assert len(feeder.frames) == 1, (buffer_type, cut)


def test_a_header_block_is_bounded() -> None:
    buffer = _BoundedFrameBuffer()
    buffer.max_frame_size = MAX_FRAME_SIZE
    buffer.add_data(frame(HEADERS, 0, 1, b"\x82"))
    assert list(buffer) == []
    piece = frame(CONTINUATION, 0, 1, bytes(16 * 1024))
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        for _ in range(MAX_HEADER_BLOCK // (16 * 1024) + 1):
            buffer.add_data(piece)
            assert list(buffer) == []


def test_a_frame_inside_a_header_block_is_refused() -> None:
    data = frame(HEADERS, 0, 1, b"\x82") + frame(DATA, 0, 1, b"x" * 100)
    for cut in range(len(data) + 1):
        with pytest.raises(h2.exceptions.ProtocolError, match="header block"):
            feed_in_pieces(_BoundedFrameBuffer(), data, [cut])


def test_a_wrong_preamble_is_refused() -> None:
    buffer = _BoundedFrameBuffer(server=True)
    buffer.add_data(PREFACE[:10])
    with pytest.raises(h2.exceptions.ProtocolError, match="preamble"):
        buffer.add_data(b"X" + PREFACE[11:])


def _pair() -> tuple[_H2Connection, _H2Connection]:
    """A client and a server with bigpool's settings, past the handshake."""
    ends = []
    for client_side in (True, False):
        conn = _H2Connection(h2_config(client_side))
        conn.incoming_buffer = _BoundedFrameBuffer(server=not client_side)
        conn.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        })
        conn.max_inbound_frame_size = MAX_FRAME_SIZE
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        ends.append(conn)
    client, server = ends
    for _ in range(2):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return client, server


def test_a_body_in_full_size_frames_arrives_as_bytes_through_h2() -> None:
    client, server = _pair()
    body = os.urandom(3 * MAX_FRAME_SIZE + 12345)
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"https"),
                                    (b":authority", b"x"), (b":path", b"/")])
    for start in range(0, len(body), MAX_FRAME_SIZE):
        piece = body[start : start + MAX_FRAME_SIZE]
        client.send_data(stream_id, piece, end_stream=start + len(piece) == len(body))
    wire = client.data_to_send()
    events = []
    rng = random.Random(3)
    pos = 0
    while pos < len(wire):
        step = rng.choice([1, 9, 4096, 256 * 1024, 300_001])
        events += server.receive_data(memoryview(wire)[pos : pos + step])
        pos += step
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert all(type(e.data) is bytes for e in data)
    assert [len(e.data) for e in data] == [MAX_FRAME_SIZE] * 3 + [12345]
    assert b"".join(e.data for e in data) == body
    assert sum(e.flow_controlled_length for e in data) == len(body)
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
