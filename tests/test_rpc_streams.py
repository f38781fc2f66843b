"""Streamed arguments and replies: their reader types, contents, ends and failures."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from bigpool.h2rpc import (
    NetworkError,
    StreamBrokenError,
    StreamReader,
    SyncStreamReader,
    wire,
)
from bigpool.h2rpc.connection import ACK_BATCH_BYTES, STREAM_WINDOW, InboundStream

DEADLINE = 10.0
MiB = 1024 * 1024


def chunks(n: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(n):
        yield bytes([i % 256]) * size


def expected(n: int, size: int = 64 * 1024) -> bytes:
    return b"".join(chunks(n, size))


class Streams:
    def __init__(self) -> None:
        self.arg_types: list[type] = []
        self.arg_error: BaseException | None = None
        self.arg_failed = asyncio.Event()
        self.reading = asyncio.Event()

    async def consume(self, reader: Any) -> tuple[int, str]:
        self.arg_types.append(type(reader))
        data = await reader.read()
        return len(data), hashlib.sha256(data).hexdigest()

    async def consume_iter(self, reader: Any) -> tuple[int, str]:
        self.arg_types.append(type(reader))
        h = hashlib.sha256()
        n = 0
        async for chunk in reader:
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()

    def consume_sync(self, reader: Any) -> tuple[int, str]:
        self.arg_types.append(type(reader))
        h = hashlib.sha256()
        n = 0
        # File-like: read(n) until b"".
        while block := reader.read(100_000):
            h.update(block)
            n += len(block)
        return n, h.hexdigest()

    async def consume_recording_failure(self, reader: StreamReader) -> int:
        n = 0
        try:
            async for chunk in reader:
                n += len(chunk)
                self.reading.set()
        except BaseException as exc:
            self.arg_error = exc
            self.arg_failed.set()
            raise
        return n

    def reply_generator(self, n: int) -> Iterator[bytes]:
        return chunks(n)

    def reply_generator_sized(self, n_size: tuple[int, int]) -> Iterator[bytes]:
        return chunks(*n_size)

    def reply_file(self, data: bytes) -> io.BytesIO:
        return io.BytesIO(data)

    async def reply_async_generator(self, n: int) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for c in chunks(n):
                yield c

        return gen()

    def reply_empty(self, _: Any = None) -> Iterator[bytes]:
        return iter(())

    def reply_big(self, mib: int) -> Iterator[bytes]:
        block = bytes(range(256)) * (MiB // 256)
        for i in range(mib):
            yield block[i % 256 :] + block[: i % 256]

    def reply_then_fail(self, n: int) -> Iterator[bytes]:
        def gen() -> Iterator[bytes]:
            yield from chunks(n)
            raise ValueError("boom")

        return gen()

    def reply_endless(self, _: Any = None) -> Iterator[bytes]:
        def gen() -> Iterator[bytes]:
            block = b"x" * MiB
            while True:
                yield block

        return gen()


async def drain(reader: StreamReader) -> int:
    n = 0
    while chunk := await reader.read_chunk():
        n += len(chunk)
    return n


def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


# -- streamed arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["S.consume", "S.consume_iter"])
@pytest.mark.parametrize("source", ["generator", "bytesio"])
async def test_streamed_argument_reaches_async_method_as_stream_reader(
    make_rpc: Any, method: str, source: str
) -> None:
    svc = Streams()
    rpc = await make_rpc({"S": svc})
    arg = chunks(40) if source == "generator" else io.BytesIO(expected(40))
    assert await rpc.call(method, arg, timeout=DEADLINE) == digest(expected(40))
    assert svc.arg_types == [StreamReader]


@pytest.mark.parametrize("source", ["generator", "bytesio", "async_generator"])
async def test_streamed_argument_reaches_thread_method_as_file_like(
    make_rpc: Any, source: str
) -> None:
    svc = Streams()
    rpc = await make_rpc({"S": svc})

    async def agen() -> AsyncIterator[bytes]:
        for c in chunks(40):
            yield c

    arg: Any = {
        "generator": lambda: chunks(40),
        "bytesio": lambda: io.BytesIO(expected(40)),
        "async_generator": agen,
    }[source]()
    assert await rpc.call("S.consume_sync", arg, timeout=DEADLINE) == digest(expected(40))
    assert svc.arg_types == [SyncStreamReader]


async def test_empty_streamed_argument(make_rpc: Any) -> None:
    svc = Streams()
    rpc = await make_rpc({"S": svc})
    assert await rpc.call("S.consume", iter(()), timeout=DEADLINE) == digest(b"")
    assert await rpc.call("S.consume_sync", io.BytesIO(b""), timeout=DEADLINE) == digest(b"")


# -- streamed replies -------------------------------------------------------------------------


async def test_streamed_reply_from_generator(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_generator", 30, timeout=DEADLINE)
    assert isinstance(reader, StreamReader)
    async with reader:
        assert await asyncio.wait_for(reader.read(), DEADLINE) == expected(30)
        assert reader.at_eof


async def test_streamed_reply_from_file_iterated(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    data = expected(50, 33_333)
    reader = await rpc.call("S.reply_file", data, timeout=DEADLINE)
    assert isinstance(reader, StreamReader)
    got = []
    async with reader:
        async for chunk in reader:
            got.append(chunk)
    assert b"".join(got) == data


async def test_streamed_reply_from_async_generator(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_async_generator", 20, timeout=DEADLINE)
    assert isinstance(reader, StreamReader)
    async with reader:
        # read(n) hands out at most n bytes and the pieces add up to the whole.
        parts = []
        while part := await asyncio.wait_for(reader.read(10_000), DEADLINE):
            assert len(part) <= 10_000
            parts.append(part)
    assert b"".join(parts) == expected(20)


async def test_empty_streamed_reply_ends_promptly(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    for _ in range(3):
        reader = await rpc.call("S.reply_empty", timeout=DEADLINE)
        assert isinstance(reader, StreamReader)
        async with reader:
            assert await asyncio.wait_for(reader.read(), 2.0) == b""
            assert [c async for c in reader] == []


async def test_32_mib_streamed_reply_arrives_whole(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    want = hashlib.sha256()
    block = bytes(range(256)) * (MiB // 256)
    for i in range(32):
        want.update(block[i % 256 :] + block[: i % 256])
    reader = await rpc.call("S.reply_big", 32, timeout=DEADLINE)
    got = hashlib.sha256()
    n = 0
    async with reader:
        async for chunk in reader:
            got.update(chunk)
            n += len(chunk)
    assert n == 32 * MiB
    assert got.hexdigest() == want.hexdigest()


async def test_streamed_reply_passes_through_a_streamed_argument(make_rpc: Any) -> None:
    """A method may hand back the StreamReader it was given (an echo of the stream)."""

    class Passthrough:
        async def echo(self, reader: StreamReader) -> StreamReader:
            return reader

    rpc = await make_rpc({"P": Passthrough()})
    reader = await rpc.call("P.echo", chunks(20), timeout=DEADLINE)
    async with reader:
        assert await asyncio.wait_for(reader.read(), DEADLINE) == expected(20)


# -- failures mid-stream ----------------------------------------------------------------------


async def test_reply_generator_failing_midway_breaks_the_stream(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_then_fail", 5, timeout=DEADLINE)
    got = []
    async with reader:
        with pytest.raises(StreamBrokenError) as info:
            async for chunk in reader:
                got.append(chunk)
    assert b"".join(got) == expected(5)
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "boom"
    assert "boom" in str(info.value)


async def test_reply_generator_failing_midway_breaks_read_all(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_then_fail", 3, timeout=DEADLINE)
    async with reader:
        with pytest.raises(StreamBrokenError) as info:
            await reader.read()
    assert isinstance(info.value.__cause__, ValueError)


async def test_argument_generator_failing_midway(make_rpc: Any) -> None:
    svc = Streams()
    rpc = await make_rpc({"S": svc})

    def bad_arg() -> Iterator[bytes]:
        yield from chunks(3)
        raise OSError("disk fell off")

    with pytest.raises(OSError, match="disk fell off"):
        await rpc.call("S.consume_recording_failure", bad_arg(), timeout=DEADLINE)
    await asyncio.wait_for(svc.arg_failed.wait(), DEADLINE)
    assert isinstance(svc.arg_error, StreamBrokenError), repr(svc.arg_error)


async def test_server_closing_mid_reply_is_not_a_short_read(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_endless", timeout=DEADLINE)
    async with reader:
        assert await asyncio.wait_for(reader.read_chunk(), DEADLINE)
        await rpc.server.close()
        with pytest.raises((StreamBrokenError, NetworkError)):
            await asyncio.wait_for(drain(reader), DEADLINE)


async def test_client_disconnect_mid_reply_is_not_a_short_read(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_endless", timeout=DEADLINE)
    async with reader:
        assert await asyncio.wait_for(reader.read_chunk(), DEADLINE)
        rpc.client.disconnect(rpc.addr)
        with pytest.raises((StreamBrokenError, NetworkError)):
            await asyncio.wait_for(drain(reader), DEADLINE)
    # The client reconnects for the next call.
    reader = await rpc.call("S.reply_generator", 2, timeout=DEADLINE)
    async with reader:
        assert await reader.read() == expected(2)


async def test_connection_dropping_mid_argument_breaks_server_reader(make_rpc: Any) -> None:
    svc = Streams()
    rpc = await make_rpc({"S": svc})
    release = threading.Event()

    def slow_arg() -> Iterator[bytes]:
        yield b"a" * 1000
        release.wait(DEADLINE)  # hold the stream open until the connection is gone
        yield b"b" * 1000

    task = asyncio.create_task(rpc.call("S.consume_recording_failure", slow_arg()))
    try:
        await asyncio.wait_for(svc.reading.wait(), DEADLINE)
        rpc.client.disconnect(rpc.addr)
        await asyncio.wait_for(svc.arg_failed.wait(), DEADLINE)
        assert isinstance(svc.arg_error, StreamBrokenError), repr(svc.arg_error)
        release.set()
        with pytest.raises(NetworkError):
            await asyncio.wait_for(task, DEADLINE)
    finally:
        release.set()
        if not task.done():
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


class Slow:
    def __init__(self) -> None:
        self.closed = threading.Event()

    async def trickle(self, seconds: float) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(10):
                await asyncio.sleep(seconds / 10)
                yield bytes([i]) * 1000

        return gen()

    def endless(self, _: Any = None) -> Iterator[bytes]:
        def gen() -> Iterator[bytes]:
            try:
                while True:
                    yield b"z" * 65536
            finally:
                self.closed.set()

        return gen()


async def test_timeout_bounds_a_streamed_reply_only_up_to_its_start(make_rpc: Any) -> None:
    """As Client.call documents: the reply may take longer to stream than ``timeout``."""
    rpc = await make_rpc({"S": Slow()})
    reader = await rpc.call("S.trickle", 1.0, timeout=0.3)
    async with reader:
        data = await asyncio.wait_for(reader.read(), DEADLINE)
    assert data == b"".join(bytes([i]) * 1000 for i in range(10))


async def test_closing_a_reply_reader_early_stops_the_server_generator(make_rpc: Any) -> None:
    svc = Slow()
    rpc = await make_rpc({"S": svc})
    reader = await rpc.call("S.endless", timeout=DEADLINE)
    assert await asyncio.wait_for(reader.read_chunk(), DEADLINE)
    reader.close()
    assert await asyncio.to_thread(svc.closed.wait, DEADLINE)


async def test_argument_generator_failing_midway_reaches_thread_reader(make_rpc: Any) -> None:
    seen: list[BaseException] = []
    failed = threading.Event()

    class ThreadSink:
        def consume(self, reader: Any) -> int:
            n = 0
            try:
                while block := reader.read(65536):
                    n += len(block)
            except BaseException as exc:
                seen.append(exc)
                failed.set()
                raise
            return n

    rpc = await make_rpc({"T": ThreadSink()})

    def bad_arg() -> Iterator[bytes]:
        yield from chunks(3)
        raise OSError("tape snapped")

    with pytest.raises(OSError, match="tape snapped"):
        await rpc.call("T.consume", bad_arg(), timeout=DEADLINE)
    assert await asyncio.to_thread(failed.wait, DEADLINE)
    assert isinstance(seen[0], StreamBrokenError), repr(seen[0])


async def _collect_by_callback(reader: StreamReader) -> tuple[bytes, int]:
    """Read a whole stream through on_arrival/read_chunk_nowait; (body, calls that found
    nothing new)."""
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    parts: list[bytes] = []
    empty = 0

    def on_arrival() -> None:
        nonlocal empty
        if done.done():
            return
        try:
            got = False
            while (chunk := reader.read_chunk_nowait()) is not None:
                got = True
                if not chunk:
                    done.set_result(b"".join(parts))
                    return
                parts.append(chunk)
            empty += not got
        except Exception as exc:
            done.set_exception(exc)

    reader.on_arrival(on_arrival)
    try:
        body = await asyncio.wait_for(done, DEADLINE)
    finally:
        reader.on_arrival(None)
    return body, empty


async def test_on_arrival_hands_over_every_chunk_and_the_end(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_generator", 30, timeout=DEADLINE)
    async with reader:
        body, _ = await _collect_by_callback(reader)
        assert body == expected(30)
        assert reader.at_eof and reader.read_chunk_nowait() == b""


async def test_on_arrival_after_data_arrived_still_fires(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_generator", 3, timeout=DEADLINE)
    async with reader:
        first = await asyncio.wait_for(reader.read_chunk(), DEADLINE)
        # Let the rest arrive with no callback set: on_arrival must still report it.
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not reader._stream.has_news():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        rest, _ = await _collect_by_callback(reader)
        assert first + rest == expected(3)


async def test_on_arrival_reports_a_broken_stream(make_rpc: Any) -> None:
    rpc = await make_rpc({"S": Streams()})
    reader = await rpc.call("S.reply_endless", timeout=DEADLINE)
    async with reader:
        assert await asyncio.wait_for(reader.read_chunk(), DEADLINE)
        rpc.client.disconnect(rpc.addr)
        with pytest.raises((StreamBrokenError, NetworkError)):
            await _collect_by_callback(reader)


def _credit_not_returned(window: Any) -> int:
    """Bytes an h2 window manager has had consumed but not handed back to the peer."""
    return int(window.max_window_size - window.current_window_size - window._bytes_processed)


async def test_credit_read_off_an_open_stream_is_batched_and_settled_at_its_end(
    make_rpc: Any,
) -> None:
    # Many small chunks read one by one while the stream is open: the credit is handed to h2
    # in batches, never held past ACK_BATCH_BYTES, and all of it once the stream ends, so no
    # stream leaves the connection's window smaller than it found it.
    rpc = await make_rpc({"S": Streams()})
    size = 4 * 1024
    n = 3 * ACK_BATCH_BYTES // size + 7
    reader = await rpc.call("S.reply_generator_sized", (n, size), timeout=DEADLINE)
    conn = rpc.client._connections[rpc.addr]
    held: list[int] = []
    async with reader:
        total = 0
        while chunk := await asyncio.wait_for(reader.read_chunk(), DEADLINE):
            total += len(chunk)
            held.append(sum(conn._unacked.values()))
    assert total == n * size
    assert max(held) > 0 and all(h < ACK_BATCH_BYTES for h in held)
    assert not conn._unacked
    assert _credit_not_returned(conn.h2._inbound_flow_control_window_manager) == 0
    assert STREAM_WINDOW > 2 * ACK_BATCH_BYTES  # a peer never waits on credit held back


def test_read_chunk_nowait_is_none_until_something_arrives() -> None:
    class Conn:
        acked = 0

        def ack(self, stream_id: int, length: int) -> None:
            Conn.acked += length

        def settle_acks(self, stream_id: int) -> None:
            pass

    stream = InboundStream(Conn(), 1)  # type: ignore[arg-type]
    reader = StreamReader(stream, "test")
    assert reader.read_chunk_nowait() is None
    stream.feed(b"abc", 3)
    assert reader.read_chunk_nowait() == b"abc" and Conn.acked == 3
    assert reader.read_chunk_nowait() is None
    stream.trailers = wire.ok_trailers()
    stream.end()
    assert reader.read_chunk_nowait() == b""
