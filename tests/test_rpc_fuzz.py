"""Fuzzing the server's HTTP/2 handling with random bytes and random frames.

The bulk runs at the protocol level: a :class:`ServerConnection` is given a fake transport,
the client preface and SETTINGS, then the fuzz bytes through ``data_received``, exactly what
the TLS transport would hand it after an authenticated handshake. A smaller run goes over real
authenticated TLS sockets. Either way, nothing may escape into the event loop's exception
handler (or out of ``data_received``), no call task or stream may outlive its connection, and
a good call must work afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import random
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hpack
import pytest
from hostile_helpers import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS_FRAME,
    WINDOW_UPDATE,
    frame,
    handle_tasks,
    parse_frames,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigpool.h2rpc import Client, Credentials, Server, wire
from bigpool.h2rpc.connection import MAX_FRAME_SIZE, MAX_HEADER_BLOCK
from bigpool.h2rpc.server import ServerConnection
from bigpool.h2rpc.streams import StreamReader

START = PREFACE + SETTINGS_FRAME


class Echo:
    async def echo(self, x: Any) -> Any:
        return x

    async def consume(self, reader: StreamReader) -> int:
        n = 0
        async for chunk in reader:
            n += len(chunk)
        return n

    async def hang(self, x: Any) -> None:
        await asyncio.Event().wait()


# fake transport ------------------------------------------------------------------------------


class _FakeSSL:
    def selected_alpn_protocol(self) -> str:
        return "h2"


class FakeTransport(asyncio.Transport):
    """Records what the server writes; closing it calls ``connection_lost`` soon, once."""

    def __init__(self, protocol: ServerConnection, peer: Any) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "write after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {
            "peername": self.peer,
            "sockname": ("127.0.0.1", 1),
            "ssl_object": _FakeSSL(),
            "peercert": {"subject": ((("commonName", "fuzzer"),),)},
        }.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closing


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    server: Server
    errors: list[dict[str, Any]]
    peers: Iterator[int]

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


def _new_harness(ssl_context: ssl.SSLContext | None) -> Harness:
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    async def make() -> Server:
        server = Server(ssl_context, max_concurrent_streams=16)
        server.register("E", Echo())
        return server

    return Harness(loop, loop.run_until_complete(make()), errors, itertools.count(1))


def _close_harness(h: Harness) -> None:
    h.run(h.server.close())
    h.loop.run_until_complete(h.loop.shutdown_asyncgens())
    h.loop.close()


@pytest.fixture(scope="module")
def harness(server_credentials: Credentials) -> Iterator[Harness]:
    h = _new_harness(server_credentials.server_context())
    yield h
    _close_harness(h)


async def _settle(conn: ServerConnection, rounds: int = 50) -> None:
    """Let call tasks run until the connection's calls wait on the peer, or are done."""
    for _ in range(rounds):
        await asyncio.sleep(0)
        if set(conn.tasks) == set(conn.streams) and all(
            not t.done() for t in conn.tasks.values()
        ):
            break


async def _feed(h: Harness, chunks: list[bytes]) -> FakeTransport:
    """A connection's whole life: handshake done, ``chunks`` arrive, then the peer leaves."""
    conn = ServerConnection(h.server)
    transport = FakeTransport(conn, ("fuzz", next(h.peers)))
    conn.connection_made(transport)
    assert conn in h.server._connections
    conn.data_received(START)
    for chunk in chunks:
        if transport.closing:
            break
        conn.data_received(chunk)  # an exception here would reach the loop's handler
        await asyncio.sleep(0)
    await _settle(conn)
    if not transport.closing:
        # Still open: every stream the server holds belongs to a call still being served.
        assert set(conn.tasks) == set(conn.streams), (conn.tasks, conn.streams)
        assert len(conn.streams) <= h.server.max_concurrent_streams
    transport.close()
    await conn.closed_event.wait()
    for _ in range(50):
        if not conn.tasks and not handle_tasks():
            break
        await asyncio.sleep(0)
    assert not conn.tasks and not conn.calls, (conn.tasks, conn.calls)
    assert not handle_tasks()
    assert conn not in h.server._connections
    return transport


# strategies ---------------------------------------------------------------------------------
#
# Structured frames are built by a seeded ``random.Random`` rather than drawn piece by piece from
# Hypothesis: drawing is what costs at 10,000 examples, and a seed reproduces a failure as well.

STREAM_IDS = [0, 1, 1, 1, 3, 3, 5, 2, 7, 0x7FFFFFFF]
HEADER_NAMES = [b":method", b":path", b":scheme", b":authority", b":status", b"content-type",
                b"content-length", b"bigrpc-timeout", b"te", b"connection", b"x-junk", b"Upper"]
HEADER_VALUES = [b"POST", b"GET", b"https", b"127.0.0.1", b"/bigrpc/E.consume", b"/bigrpc/E.hang",
                 b"/bigrpc/E.nope", b"/bigrpc/Nope.echo", b"/bigrpc/E._x", b"/bigrpc/E", b"/",
                 b"*", wire.CONTENT_TYPE_STREAM, b"text/plain", b"0", b"5", b"1e-9", b"-1",
                 b"nan", b"inf", b"1e308", b"trailers", b"ok", b"error"]
# Requests the server acts on: a streamed argument to a real method, or a method that does not
# exist. (Value-typed calls of real methods are left out: they would unpickle random bytes,
# which an authenticated peer may send but which proves nothing here.)
PATHS = [b"/bigrpc/E.consume", b"/bigrpc/E.hang", b"/bigrpc/E.nope", b"/x"]
CONTENT_TYPES = [wire.CONTENT_TYPE_STREAM, b"text/plain"]


def _request_block(path: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]]) -> bytes:
    headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"x"),
               (b":path", path), (b"content-type", content_type), *extra]
    data: bytes = hpack.Encoder().encode(headers)
    return data


def _pick(rng: random.Random, known: list[Any], randbits: int) -> Any:
    if rng.random() < 0.8:
        return rng.choice(known)
    return rng.getrandbits(randbits) if randbits else rng.randbytes(rng.randrange(24))


def _header_list(rng: random.Random, n: int) -> list[tuple[bytes, bytes]]:
    return [(_pick(rng, HEADER_NAMES, 0), _pick(rng, HEADER_VALUES, 0)) for _ in range(n)]


def _header_block(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.8:
        return _request_block(
            rng.choice(PATHS), rng.choice(CONTENT_TYPES), _header_list(rng, rng.choice([0, 0, 0, 1, 2]))
        )
    if r < 0.95:
        data: bytes = hpack.Encoder().encode(_header_list(rng, rng.randrange(7)))
        return data
    return rng.randbytes(rng.randrange(40))


def _one_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    sid = _pick(rng, STREAM_IDS, 31)
    flags = _pick(rng, [0, 1, 4, 5, 8, 0x20, 0x25], 8)
    if kind <= 3:  # a header block, possibly split into HEADERS + CONTINUATION
        block = _header_block(rng)
        cut = rng.randrange(len(block) + 1) if rng.random() < 0.3 else len(block)
        if cut == len(block):
            return frame(HEADERS, flags | END_HEADERS, sid, block)
        last = rng.choice([0, END_HEADERS])
        return frame(HEADERS, flags & ~END_HEADERS, sid, block[:cut]) + frame(
            CONTINUATION, last, _pick(rng, STREAM_IDS, 31), block[cut:]
        )
    if kind <= 6:  # DATA
        return frame(DATA, flags & 0x09, sid, rng.randbytes(rng.randrange(200)))
    if kind == 7:  # well-formed control frames with random values
        ftype = rng.choice([2, 3, 4, 6, 7, 8])
        size = {2: 5, 3: 4, 4: 6 * rng.randrange(4), 6: 8, 7: 8, 8: 4}[ftype]
        return frame(ftype, flags, sid, rng.randbytes(size))
    # anything at all, with a header that may lie about the length
    payload = rng.randbytes(rng.randrange(64))
    length = len(payload) + rng.choice([0, 0, 0, -1, 1, 1000])
    return frame(rng.randrange(256), flags, sid, payload, length=max(length, 0))


def _conversation(rng: random.Random) -> bytes:
    """Mostly well-formed: requests on streams 1, 3, 5..., then frames on them, in some order."""
    out = []
    open_ids = []
    for sid in range(1, 2 * rng.randrange(1, 6), 2):
        end = END_STREAM if rng.random() < 0.3 else 0
        out.append(frame(HEADERS, END_HEADERS | end, sid, _header_block(rng)))
        if not end:
            open_ids.append(sid)
    for _ in range(rng.randrange(8)):
        r = rng.random()
        sid = rng.choice(open_ids) if open_ids and r < 0.9 else _pick(rng, STREAM_IDS, 31)
        if r < 0.5:
            out.append(frame(DATA, rng.choice([0, 0, END_STREAM]), sid, rng.randbytes(rng.randrange(300))))
        elif r < 0.6:  # trailers
            block = hpack.Encoder().encode([(b"bigrpc-status", rng.choice([b"ok", b"error", b"?"]))])
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, block))
        elif r < 0.7:
            out.append(frame(RST_STREAM, 0, sid, rng.randbytes(4)))
        elif r < 0.8:
            out.append(frame(WINDOW_UPDATE, 0, rng.choice([0, sid]), rng.randbytes(4)))
        else:
            out.append(_one_frame(rng))
    if rng.random() < 0.2:
        rng.shuffle(out)
    return b"".join(out)


def frames_from_seed(seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.75:
        data = _conversation(rng)
    else:
        data = b"".join(_one_frame(rng) for _ in range(rng.randrange(1, 9)))
    if rng.random() < 0.1:
        data += rng.randbytes(rng.randrange(40))  # trailing garbage
    return data


FUZZ = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.integers(0, 2**64).map(frames_from_seed),
    st.integers(0, 2**64).map(frames_from_seed),
)


def _chunks(data: bytes, cut: int) -> list[bytes]:
    """``data`` in one piece, or cut in two (a frame split across reads)."""
    cut %= len(data) + 1
    return [data[:cut], data[cut:]] if 0 < cut < len(data) else [data]


# protocol-level fuzz ---------------------------------------------------------------------------


@settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=FUZZ, cut=st.integers(0, 2**16))
def test_fuzz_bytes_never_crash_or_leak(harness: Harness, data: bytes, cut: int) -> None:
    harness.run(_feed(harness, _chunks(data, cut)))
    assert harness.errors == []


def test_after_fuzzing_a_good_call_still_works(
    harness: Harness, client_credentials: Credentials
) -> None:
    async def go() -> None:
        host, port = await harness.server.start("127.0.0.1", 0)
        client = Client(client_credentials.client_context())
        try:
            assert await client.call(f"{host}:{port}", "E.echo", [1, "two"]) == [1, "two"]
        finally:
            await client.close()

    harness.run(go())
    gc.collect()  # "Task exception was never retrieved" is reported when a task is collected
    harness.run(asyncio.sleep(0))
    assert harness.errors == []


# bounds on what a peer can make the server buffer --------------------------------------------


def test_frame_header_announcing_too_much_is_refused_at_once(harness: Harness) -> None:
    async def go() -> None:
        conn = ServerConnection(harness.server)
        transport = FakeTransport(conn, "big-frame")
        conn.connection_made(transport)
        conn.data_received(START + frame(DATA, 0, 1, b"", length=MAX_FRAME_SIZE + 1))
        assert transport.closing, "server waited for the body of an overlong frame"
        assert any(f.type == GOAWAY for f in parse_frames(bytes(transport.written)))
        await conn.closed_event.wait()

    harness.run(go())


def test_header_block_is_bounded(harness: Harness) -> None:
    async def go() -> None:
        conn = ServerConnection(harness.server)
        transport = FakeTransport(conn, "continuations")
        conn.connection_made(transport)
        conn.data_received(START + frame(HEADERS, 0, 1, _request_block(b"/x", b"", [])))
        fed = 0
        piece = frame(CONTINUATION, 0, 1, b"\x00" * (16 * 1024))
        while not transport.closing and fed < 64 * 1024 * 1024:
            conn.data_received(piece)
            fed += len(piece)
        assert fed <= MAX_HEADER_BLOCK + len(piece), f"server buffered {fed} bytes of headers"
        await conn.closed_event.wait()

    harness.run(go())


# fuzz over real authenticated TLS ----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_harness(
    server_credentials: Credentials, client_credentials: Credentials
) -> Iterator[tuple[Harness, Client, str]]:
    h = _new_harness(server_credentials.server_context())

    async def start() -> tuple[Client, str]:
        host, port = await h.server.start("127.0.0.1", 0)
        return Client(client_credentials.client_context()), f"{host}:{port}"

    client, addr = h.run(start())
    yield h, client, addr
    h.run(client.close())
    _close_harness(h)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=FUZZ)
def test_fuzz_over_tls(
    tls_harness: tuple[Harness, Client, str], client_credentials: Credentials, data: bytes
) -> None:
    h, client, addr = tls_harness
    host, port = addr.rsplit(":", 1)
    ctx = client_credentials.client_context()

    async def go() -> None:
        assert await client.call(addr, "E.echo", "before") == "before"
        good = {c.peer for c in h.server._connections}
        _, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
        writer.write(START + data)
        await asyncio.sleep(0.002)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while {c.peer for c in h.server._connections} != good or handle_tasks():
            assert loop.time() < end, "server kept the fuzzer's connection or its calls"
            await asyncio.sleep(0.002)
        assert await client.call(addr, "E.echo", "after") == "after"

    h.run(go())
    assert h.errors == []
