"""StreamWriter (bodies pushed without awaiting) and the DATA fast paths under it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import pytest

from bigpool.h2rpc import NetworkError, StreamBrokenError, StreamReader, StreamWriter
from bigpool.h2rpc.connection import _H2Connection, h2_config

DEADLINE = 10.0
MiB = 1024 * 1024


class Sink:
    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def digest(self, reader: StreamReader) -> tuple[int, str]:
        self.started.set()
        h = hashlib.sha256()
        n = 0
        async for chunk in reader:
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()

    async def refuse(self, reader: StreamReader) -> str:
        await reader.read_chunk()
        raise PermissionError("not this one")


class Source:
    """Hands out a writer that the test fills (through ``self.writer``)."""

    def __init__(self) -> None:
        self.writer: StreamWriter | None = None
        self.made = asyncio.Event()

    async def stream(self, _: Any = None) -> StreamWriter:
        self.writer = StreamWriter()
        self.made.set()
        return self.writer


def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


async def test_writes_before_and_after_the_call_starts_arrive_in_order(make_rpc: Any) -> None:
    sink = Sink()
    rpc = await make_rpc({"S": sink})
    blocks = [os.urandom(n) for n in (10, 70_000, 1, 3 * MiB, 500)]
    writer = StreamWriter()
    writer.write(blocks[0])  # before the stream exists: waits in the writer
    assert writer.buffered == len(blocks[0])
    call = asyncio.create_task(rpc.call("S.digest", writer, timeout=DEADLINE))
    await asyncio.wait_for(sink.started.wait(), DEADLINE)
    for block in blocks[1:]:
        writer.write(bytearray(block) if len(block) == 1 else block)
    writer.write(memoryview(b"xyz")[1:])
    writer.close()
    assert await asyncio.wait_for(call, DEADLINE) == digest(b"".join(blocks) + b"yz")


async def test_a_write_that_fits_the_window_goes_at_once(make_rpc: Any) -> None:
    sink = Sink()
    rpc = await make_rpc({"S": sink})
    writer = StreamWriter()
    call = asyncio.create_task(rpc.call("S.digest", writer, timeout=DEADLINE))
    await asyncio.wait_for(sink.started.wait(), DEADLINE)
    writer.write(b"a" * 1000)
    writer.flush()
    assert writer.buffered == 0  # handed to h2 in write(), nothing left for the pump
    writer.close()
    assert await asyncio.wait_for(call, DEADLINE) == digest(b"a" * 1000)


async def test_a_body_larger_than_the_window_is_buffered_and_drained(make_rpc: Any) -> None:
    sink = Sink()
    rpc = await make_rpc({"S": sink})
    writer = StreamWriter()
    call = asyncio.create_task(rpc.call("S.digest", writer, timeout=DEADLINE))
    await asyncio.wait_for(sink.started.wait(), DEADLINE)
    block = os.urandom(MiB)
    for _ in range(40):  # 40 MiB: more than a stream's and a connection's window
        writer.write(block)
    assert writer.buffered > 0
    await asyncio.wait_for(writer.drain(), DEADLINE)
    assert writer.buffered == 0
    writer.close()
    assert await asyncio.wait_for(call, DEADLINE) == digest(block * 40)


async def test_writer_misuse_is_named() -> None:
    writer = StreamWriter()
    with pytest.raises(TypeError, match="takes bytes, not str"):
        writer.write("text")  # type: ignore[arg-type]
    writer.close()
    with pytest.raises(ValueError, match="closed StreamWriter"):
        writer.write(b"late")


async def test_a_server_answering_early_ends_the_argument(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Sink()})
    writer = StreamWriter()
    writer.write(b"first")
    with pytest.raises(PermissionError, match="not this one"):
        await asyncio.wait_for(rpc.call("S.refuse", writer), DEADLINE)
    writer.write(b"dropped")  # the stream is over: nothing waits for it
    assert writer.buffered == 0


async def test_a_lost_connection_fails_an_idle_argument_writer(make_rpc: Any) -> None:
    sink = Sink()
    rpc = await make_rpc({"S": sink})
    writer = StreamWriter()
    call = asyncio.create_task(rpc.call("S.digest", writer))
    await asyncio.wait_for(sink.started.wait(), DEADLINE)
    writer.write(b"some")
    rpc.client.disconnect(rpc.addr)  # the writer is idle: nothing of its own wakes it
    with pytest.raises(NetworkError):
        await asyncio.wait_for(call, DEADLINE)
    assert writer.failed is not None


async def test_a_reply_writer_streams_to_the_reader(make_rpc: Any) -> None:
    source = Source()
    rpc = await make_rpc({"S": source})
    reader = await rpc.call("S.stream", timeout=DEADLINE)
    assert isinstance(reader, StreamReader)
    assert source.writer is not None
    blocks = [os.urandom(n) for n in (5, 2 * MiB, 17 * MiB, 9)]
    for block in blocks:
        source.writer.write(block)
    source.writer.close()
    async with reader:
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b"".join(blocks)


async def test_an_aborted_reply_writer_breaks_the_reader_with_its_error(make_rpc: Any) -> None:
    source = Source()
    rpc = await make_rpc({"S": source})
    reader = await rpc.call("S.stream", timeout=DEADLINE)
    assert source.writer is not None
    source.writer.write(b"partial")
    source.writer.abort(KeyError("gone"))
    async with reader:
        with pytest.raises(StreamBrokenError) as info:
            await asyncio.wait_for(reader.read(), DEADLINE)
    assert isinstance(info.value.__cause__, KeyError)


async def test_closing_the_reader_fails_the_reply_writer(make_rpc: Any) -> None:
    source = Source()
    rpc = await make_rpc({"S": source})
    reader = await rpc.call("S.stream", timeout=DEADLINE)
    writer = source.writer
    assert writer is not None
    writer.write(b"x" * 1000)
    reader.close()  # resets the stream: the server's call is cancelled

    async def failed() -> None:
        while writer.failed is None:
            writer.write(b"y")
            await asyncio.sleep(0.01)

    await asyncio.wait_for(failed(), DEADLINE)


# -- the sans-IO fast paths -------------------------------------------------------------------


def _pair() -> tuple[_H2Connection, _H2Connection, int]:
    """A client and a server connection with one open request stream between them."""
    client = _H2Connection(h2_config(client_side=True))
    server = _H2Connection(h2_config(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                              (b":authority", b"x"), (b":path", b"/")])
    server.receive_data(client.data_to_send())
    return client, server, sid


def test_send_data_now_charges_the_windows_as_h2_does() -> None:
    client, server, sid = _pair()
    before = client.local_flow_control_window(sid)
    assert client.send_data_now(sid, b"hello")
    assert client.local_flow_control_window(sid) == before - 5
    big = os.urandom(16_000)  # under the default 16 KiB frame size
    assert client.send_data_now(sid, memoryview(big))
    events = server.receive_data(client.data_to_send())
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in data) == b"hello" + big
    assert [e.flow_controlled_length for e in data] == [5, 16_000]
    assert server._get_stream_by_id(sid).inbound_flow_control_window == 65535 - 16_005


def test_send_data_now_refuses_what_h2_would_not_send_at_once() -> None:
    client, _, sid = _pair()
    window = client.local_flow_control_window(sid)
    assert not client.send_data_now(sid, b"x" * (window + 1))  # beyond the window
    assert not client.send_data_now(sid, b"")  # nothing to send
    assert not client.send_data_now(sid + 2, b"x")  # no such stream
    client.end_stream(sid)
    assert not client.send_data_now(sid, b"x")  # closed for sending
    assert client.local_flow_control_window(sid) == window  # nothing was charged


def test_receiving_beyond_the_window_is_a_protocol_error() -> None:
    client, server, sid = _pair()
    # The client believes in a larger window than the server granted (a misbehaving peer).
    client.outbound_flow_control_window = 1 << 20
    client._get_stream_by_id(sid).outbound_flow_control_window = 1 << 20
    assert client.send_data_now(sid, b"x" * 16_000)
    for _ in range(4):
        client.send_data_now(sid, b"x" * 16_000)
    with pytest.raises(h2.exceptions.FlowControlError):
        server.receive_data(client.data_to_send())
    assert server.state_machine.state is h2.connection.ConnectionState.CLOSED


def test_data_after_end_stream_still_goes_through_h2() -> None:
    client, server, sid = _pair()
    client.send_data(sid, b"last", end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    # A DATA frame on the half-closed stream: h2's own handling (a stream error).
    frame = bytes([0, 0, 1, 0, 0]) + sid.to_bytes(4, "big") + b"z"
    server.receive_data(frame)
    out = server.data_to_send()
    assert out[3] == 0x3  # RST_STREAM
