"""A method may reply before it has read all of its streamed argument (or any of it).

HTTP/2 lets a server answer before the request body is complete and then stop the rest with
RST_STREAM(NO_ERROR). The caller must get that reply, not a StreamBrokenError.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bigpool.h2rpc import BadRequestError, StreamBrokenError, StreamReader, wire
from bigpool.h2rpc.connection import STREAM_WINDOW

DEADLINE = 10.0
MiB = 1024 * 1024
WINDOW_CHUNKS = STREAM_WINDOW // MiB


class Early:
    def __init__(self) -> None:
        self.window_full = threading.Event()

    def big(self) -> Iterator[bytes]:
        block = b"q" * MiB
        for i in range(4 * WINDOW_CHUNKS):
            if i == WINDOW_CHUNKS:
                # The server reads nothing, so this chunk waits for flow-control window.
                self.window_full.set()
            yield block

    async def refuse(self, reader: StreamReader) -> None:
        raise ValueError("not reading that")

    async def refuse_when_window_full(self, reader: StreamReader) -> None:
        assert await asyncio.to_thread(self.window_full.wait, DEADLINE)
        raise ValueError("window full")

    async def first_chunk(self, reader: StreamReader) -> int:
        return len(await reader.read_chunk())

    def refuse_in_thread(self, reader: Any) -> None:
        raise ValueError("not reading that either")


async def test_method_raising_before_reading_its_stream(make_rpc: Any) -> None:
    svc = Early()
    rpc = await make_rpc({"E": svc})
    with pytest.raises(ValueError, match="not reading that"):
        await rpc.call("E.refuse", svc.big(), timeout=DEADLINE)
    with pytest.raises(ValueError, match="either"):
        await rpc.call("E.refuse_in_thread", svc.big(), timeout=DEADLINE)


async def test_method_raising_while_caller_waits_for_window(make_rpc: Any) -> None:
    svc = Early()
    rpc = await make_rpc({"E": svc})
    for _ in range(5):  # the caller's state when the reset lands varies: try a few times
        svc.window_full.clear()
        with pytest.raises(ValueError, match="window full"):
            await rpc.call("E.refuse_when_window_full", svc.big(), timeout=DEADLINE)


async def test_method_replying_before_reading_all_of_its_stream(make_rpc: Any) -> None:
    svc = Early()
    rpc = await make_rpc({"E": svc})
    n = await rpc.call("E.first_chunk", svc.big(), timeout=DEADLINE)
    assert 0 < n <= MiB
    # The connection is still usable afterwards.
    assert await rpc.call("E.first_chunk", iter([b"abc"]), timeout=DEADLINE) == 3


async def test_sender_waiting_for_window_sees_the_reset(make_rpc: Any) -> None:
    """A sender blocked on flow control must not wait forever once the peer resets the stream."""
    class Never:
        def __init__(self) -> None:
            self.started = asyncio.Event()

        async def hold(self, reader: StreamReader) -> None:
            self.started.set()
            await asyncio.Event().wait()

    svc = Never()
    rpc = await make_rpc({"N": svc})
    conn = await rpc.client.connection(rpc.addr)
    headers = wire.request_headers(
        conn.addr.encode("ascii"), wire.method_path("N.hold"), streamed=True, timeout=None
    )
    stream = await conn.open_stream(headers, end_stream=False)
    # More than the stream's window: the method never reads, so this blocks on flow control.
    body = b"x" * (STREAM_WINDOW + MiB)
    sender = asyncio.create_task(conn.send_data(stream.id, body, end_stream=False))
    try:
        await asyncio.wait_for(svc.started.wait(), DEADLINE)
        (server_conn,) = rpc.server._connections

        async def window_spent() -> None:
            while conn.h2.local_flow_control_window(stream.id) > 0:
                assert not sender.done(), "send finished although the peer reads nothing"
                await asyncio.sleep(0.01)  # no event for this: poll, under a deadline

        await asyncio.wait_for(window_spent(), DEADLINE)
        server_conn.reset_stream(stream.id)
        with pytest.raises(StreamBrokenError):
            await asyncio.wait_for(sender, DEADLINE)
    finally:
        sender.cancel()
        conn.reset_stream(stream.id)


@pytest.mark.parametrize("size", [10_000, STREAM_WINDOW + 4 * MiB])
async def test_argument_over_the_servers_limit_is_a_bad_request(make_rpc: Any, size: int) -> None:
    class Echo:
        def echo(self, x: Any) -> Any:
            return x

    rpc = await make_rpc({"E": Echo()}, max_message_size=1000)
    assert await rpc.call("E.echo", b"y" * 100, timeout=DEADLINE) == b"y" * 100
    with pytest.raises(BadRequestError, match="exceeds the limit of 1000 bytes"):
        await rpc.call("E.echo", b"y" * size, timeout=DEADLINE)
    assert await rpc.call("E.echo", b"z", timeout=DEADLINE) == b"z"
