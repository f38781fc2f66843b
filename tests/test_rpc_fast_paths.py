"""The fast paths of the HTTP/2 layer give the same bytes and the same h2 behaviour."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import hyperframe.frame

from bigpool.h2rpc import StreamReader
from bigpool.h2rpc.connection import ZERO_COPY_DATA_BYTES, _H2Connection, h2_config


class Digest:
    async def digest(self, reader: StreamReader) -> str:
        h = hashlib.sha256()
        async for chunk in reader:
            h.update(chunk)
        return h.hexdigest()

    async def back(self, blocks: list[bytes]) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            for b in blocks:
                yield b
        return gen()


async def test_large_and_small_chunks_of_every_kind_arrive_intact(make_rpc: Any) -> None:
    rpc = await make_rpc({"D": Digest()})
    blocks: list[Any] = [
        os.urandom(1 << 20), os.urandom(10), os.urandom(ZERO_COPY_DATA_BYTES),
        bytearray(os.urandom(70_000)), memoryview(os.urandom(3 << 20))[5:], os.urandom(1),
    ]
    want = hashlib.sha256(b"".join(bytes(b) for b in blocks)).hexdigest()

    async def gen() -> AsyncIterator[Any]:
        for b in blocks:
            yield b

    assert await rpc.call("D.digest", gen()) == want
    reader = await rpc.call("D.back", [bytes(b) for b in blocks])
    assert hashlib.sha256(await reader.read()).hexdigest() == want


def test_data_to_send_gives_the_same_bytes_as_plain_h2() -> None:
    import h2.connection

    payload = os.urandom(100_000)
    out = []
    for cls in (h2.connection.H2Connection, _H2Connection):
        conn = cls(h2_config(client_side=True))
        conn.initiate_connection()
        conn.max_outbound_frame_size = 1 << 20
        conn.outbound_flow_control_window = 1 << 20
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                (b":authority", b"x"), (b":path", b"/")])
        conn._get_stream_by_id(sid).outbound_flow_control_window = 1 << 20
        conn.send_data(sid, payload)
        conn.send_data(sid, b"tail", end_stream=True)
        out.append(conn.data_to_send())
    assert out[0] == out[1]


def test_data_frame_repr_is_unchanged() -> None:
    frame = hyperframe.frame.DataFrame(1, data=b"0123456789abcdef")
    assert repr(frame).endswith("<hex:30313233343536373839...>")
