"""The pool's record channel to a machine on the driver's host (bigpool.pool_socket): the
socket on its own, on asyncio's loop and on uvloop's, and pools that use it or do not."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from pool_support import wait_until

from bigpool import BigPool
from bigpool.h2rpc import StreamWriter
from bigpool.pool_socket import (
    TOKEN_BYTES,
    ChannelBrokenError,
    RecordChannel,
    connect,
    listen_once,
)
from bigpool.pool_wire import Chunk, ChunkDecoder, encode_chunk
from bigpool.systems.local import LocalSystem
from bigpool.worker import SERVICE_NAME, PoolWorkerService

LOOPS: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
try:
    import uvloop

    LOOPS.append(uvloop.new_event_loop)
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    pass


@pytest.fixture(params=LOOPS, ids=lambda f: f.__module__.split(".")[0])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def run_on_loop(coro: Coroutine[Any, Any, Any]) -> Any:
        loop = request.param()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, 20))
        finally:
            loop.close()

    return run_on_loop


TOKEN = os.urandom(TOKEN_BYTES)


async def _until(condition: Callable[[], Any], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _read_all(channel: RecordChannel) -> bytes:
    """Everything ``channel`` receives until the peer ends its side."""
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    parts: list[bytes] = []

    def drain() -> None:
        try:
            while (data := channel.read_chunk_nowait()) is not None:
                if not data:
                    if not done.done():
                        done.set_result(b"".join(parts))
                    return
                parts.append(data)
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)

    channel.on_arrival(drain)
    return await done


def test_records_flow_both_ways_and_each_end_sees_the_other_end(tmp_path: Path, run: Any) -> None:
    async def main() -> None:
        opened: list[RecordChannel] = []
        listener = await listen_once(str(tmp_path), TOKEN, opened.append)
        assert os.path.exists(listener.path)
        client = await connect(listener.path, TOKEN)
        await _until(lambda: opened, "the machine's end to open")
        server = opened[0]
        # The listener let go of its path once the one connection came.
        assert listener.closed and not os.path.exists(listener.path)
        chunks = [Chunk(i, b"f" * 16, b"code" if i == 0 else None, pickle_bytes(i), False)
                  for i in range(200)]
        for chunk in chunks:
            for part in encode_chunk(chunk):
                client.write(part)
        client.write(os.urandom(1 << 20))  # one large write among the small ones
        client.close()
        received = await _read_all(server)
        decoded = ChunkDecoder().feed(received[: len(received) - (1 << 20)])
        assert [c.chunk_id for c in decoded] == list(range(200))
        assert decoded[7].args == pickle_bytes(7)
        with pytest.raises(ValueError, match="closed"):
            client.write(b"more")
        # The other way, while the first way is ended.
        server.write(b"result records")
        server.write(bytearray(b" and "))
        server.write(memoryview(b"more"))
        server.close()
        assert await _read_all(client) == b"result records and more"
        client.abort()
        server.abort()

    run(main())


def pickle_bytes(i: int) -> bytes:
    return i.to_bytes(4, "big") * 3


def test_a_token_split_over_writes_opens_and_what_follows_it_is_kept(tmp_path: Path,
                                                                     run: Any) -> None:
    async def main() -> None:
        opened: list[RecordChannel] = []
        listener = await listen_once(str(tmp_path), TOKEN, opened.append)
        _, raw = await asyncio.get_running_loop().create_unix_connection(
            RecordChannel, listener.path)
        raw.write(TOKEN[:5])
        raw.flush()
        await asyncio.sleep(0.05)
        assert not opened  # not yet: the token is not all there
        raw.write(TOKEN[5:] + b"first bytes")
        raw.close()
        await _until(lambda: opened, "the channel to open")
        assert await _read_all(opened[0]) == b"first bytes"
        raw.abort()
        opened[0].abort()

    run(main())


@pytest.mark.parametrize("sent", [b"x" * TOKEN_BYTES, TOKEN[:-1] + bytes([TOKEN[-1] ^ 1]),
                                  b"GET / HTTP/1.1\r\n"])
def test_a_connection_without_the_token_is_closed_and_never_opens(tmp_path: Path, run: Any,
                                                                  sent: bytes) -> None:
    async def main() -> None:
        opened: list[RecordChannel] = []
        listener = await listen_once(str(tmp_path), TOKEN, opened.append)
        _, wrong = await asyncio.get_running_loop().create_unix_connection(
            RecordChannel, listener.path)
        wrong.write(sent)
        wrong.flush()
        assert await _read_all(wrong) == b""  # closed by the machine without a byte
        wrong.abort()
        assert not opened
        # The listener still waits for the driver.
        right = await connect(listener.path, TOKEN)
        await _until(lambda: opened, "the driver's connection to open")
        right.abort()
        opened[0].abort()

    run(main())


def test_closing_a_listener_closes_connections_still_to_present_the_token(tmp_path: Path,
                                                                           run: Any) -> None:
    """A pool stopped while its machine waits for the token must leave no socket open (the
    machine's loop would close with it)."""

    async def main() -> None:
        opened: list[RecordChannel] = []
        listener = await listen_once(str(tmp_path), TOKEN, opened.append)
        _, early = await asyncio.get_running_loop().create_unix_connection(
            RecordChannel, listener.path)
        await _until(lambda: listener.unopened, "the machine to accept the connection")
        listener.close()
        assert await _read_all(early) == b""
        early.abort()
        assert not opened and not os.path.exists(listener.path)

    run(main())


def test_a_listener_nobody_connects_to_goes_after_its_timeout(tmp_path: Path, run: Any) -> None:
    async def main() -> None:
        listener = await listen_once(str(tmp_path), TOKEN, lambda c: None, timeout=0.1)
        await _until(lambda: listener.closed, "the listener to give up")
        assert not os.path.exists(listener.path)
        with pytest.raises(OSError):
            await connect(listener.path, TOKEN)

    run(main())


def test_a_short_token_is_refused(tmp_path: Path, run: Any) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="token"):
            await listen_once(str(tmp_path), b"short", lambda c: None)

    run(main())


def test_a_peer_that_goes_away_ends_the_stream_and_later_writes_fail_quietly(
        tmp_path: Path, run: Any) -> None:
    """A process that dies closes its Unix socket as cleanly as one that ends its side, so
    the reader sees an end either way (the pool then asks the machine's system how it went,
    and a record cut short is an error of the record decoder)."""

    async def main() -> None:
        opened: list[RecordChannel] = []
        listener = await listen_once(str(tmp_path), TOKEN, opened.append)
        client = await connect(listener.path, TOKEN)
        await _until(lambda: opened, "the channel to open")
        server = opened[0]
        reading = asyncio.ensure_future(_read_all(server))
        client.write(b"partial")
        client.flush()
        await _until(lambda: server.bytes_read == len(b"partial"), "the bytes to arrive")
        client.abort()
        assert await reading == b"partial"
        server.write(b"dropped")
        await _until(lambda: server.failed is not None, "the write to find the socket gone")
        server.write(b"dropped too")  # no error: the reader already knows
        with pytest.raises(TypeError, match="bytes"):
            server.write("text")  # type: ignore[arg-type]
        server.abort()

    run(main())


def test_aborting_an_end_wakes_its_own_reader(tmp_path: Path, run: Any) -> None:
    """The driver ends a channel of a machine its keepalives declared lost this way: the
    reader must hear of it, or the machine's chunks would wait forever."""

    async def main() -> None:
        opened: list[RecordChannel] = []
        listener = await listen_once(str(tmp_path), TOKEN, opened.append)
        client = await connect(listener.path, TOKEN)
        await _until(lambda: opened, "the channel to open")
        reading = asyncio.ensure_future(_read_all(client))
        await asyncio.sleep(0.02)
        client.abort()
        with pytest.raises(ChannelBrokenError):
            await reading
        opened[0].abort()

    run(main())


# pools -----------------------------------------------------------------------------------


def _double(x: int) -> int:
    return 2 * x


def test_a_local_pool_carries_its_records_on_channels_and_removes_their_sockets() -> None:
    with BigPool(2, system="local") as pool:
        assert pool.map(_double, range(2000), chunksize=3) == [2 * x for x in range(2000)]
        assert pool.apply(_double, (21,)) == 42
        feeds = pool._scheduler.feeds
        assert len(feeds) == 2
        assert all(isinstance(feed.writer, RecordChannel) for feed in feeds)
        directory = pool._shared_dir
        assert directory is not None
        assert not [name for name in os.listdir(directory) if name.startswith("c")]


def test_without_shared_memory_the_records_go_over_the_network() -> None:
    with BigPool(2, system="local", shared_memory=False) as pool:
        assert pool.map(_double, range(500), chunksize=3) == [2 * x for x in range(500)]
        assert all(isinstance(feed.writer, StreamWriter) for feed in pool._scheduler.feeds)


def test_a_machine_killed_mid_map_over_its_channel_loses_nothing() -> None:
    system = LocalSystem()
    with BigPool(2, system=system) as pool:
        victim = pool.machines[0]
        results = []
        for value in pool.imap_unordered(_double, range(5000), chunksize=5):
            results.append(value)
            if len(results) == 1000:
                system.kill(victim, signal.SIGKILL)
        assert sorted(results) == [2 * x for x in range(5000)]
        wait_until(lambda: pool._scheduler.lost, 10, "the loss to be recorded")
        addr, reason = pool._scheduler.lost[0]
        assert addr == victim.addr and "SIGKILL" in str(reason), reason


def test_a_machine_not_on_the_drivers_host_refuses_a_channel() -> None:
    with BigPool(1, system="local", shared_memory=False) as pool:
        machine = pool.machines[0]
        with pytest.raises(RuntimeError, match="does not share the driver's host"):
            machine.call(f"{SERVICE_NAME}.open_channel", TOKEN)


def test_the_service_refuses_a_channel_before_init() -> None:
    service = PoolWorkerService(1)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="not started"):
            await service.open_channel(TOKEN)

    asyncio.run(main())
