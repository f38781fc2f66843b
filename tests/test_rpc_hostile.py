"""Hostile peers against a running TLS server.

Every attack must be refused without the server unpickling a byte the attacker sent, without
it holding on to a connection, stream or task afterwards, and without disturbing a legitimate
client's calls on another connection, which are made before, during and after each attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import random
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import h2.events
import pytest
from cryptography import x509
from h2.errors import ErrorCodes
from hostile_helpers import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    POISON,
    POISONED,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_FRAME,
    DecodeWatch,
    Frame,
    assert_settles,
    exchange,
    frame,
    goaway_code,
    h2_client,
    parse_frames,
    poisoned_request,
    request_headers,
)

from bigpool.h2rpc import Authority, Credentials, Server, wire
from bigpool.h2rpc import connection as connection_module


class Echo:
    async def echo(self, x: Any) -> Any:
        return x

    def echo_in_thread(self, x: Any) -> Any:
        return x


@dataclass
class Rig:
    """A server with one legitimate, connected client, and the watches on the server."""

    rpc: Any
    watch: DecodeWatch
    good_peers: set[Any]
    loop_errors: list[dict[str, Any]]
    calls: int = 0
    hostile_peers: list[Any] = field(default_factory=list)

    @property
    def server(self) -> Server:
        server: Server = self.rpc.server
        return server

    @property
    def port(self) -> int:
        return int(self.rpc.addr.rsplit(":", 1)[1])

    async def good_call(self) -> None:
        self.calls += 1
        value = {"call": self.calls, "data": b"x" * 100}
        assert await self.rpc.call("E.echo", value, timeout=10) == value
        assert await self.rpc.call("E.echo_in_thread", [self.calls], timeout=10) == [self.calls]

    async def check_after(self, *hostile: Any) -> None:
        """The attack left nothing behind and touched nothing; the good client carries on."""
        await self.good_call()
        await assert_settles(self.server, self.good_peers)
        for peer in hostile:
            if peer is not None:
                assert peer not in self.good_peers
                assert peer not in self.watch.peers, f"server unpickled bytes from {peer}"
        assert set(self.watch.peers) <= self.good_peers, self.watch.peers
        assert POISONED == []
        assert self.watch.poison == 0
        assert self.loop_errors == []


@pytest.fixture
async def rig(make_rpc: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    rpc = await make_rpc({"E": Echo()})
    watch = DecodeWatch(monkeypatch)
    POISONED.clear()
    rig = Rig(rpc, watch, set(), errors)
    await rig.good_call()
    rig.good_peers = {conn.peer for conn in rpc.server._connections}
    assert len(rig.good_peers) == 1
    # The watch does see the server unpickle: the good client's arguments.
    assert watch.peers and set(watch.peers) == rig.good_peers
    yield rig
    loop.set_exception_handler(None)


def _context(creds: Credentials | None, ca_pem: bytes, alpn: list[str] | None) -> ssl.SSLContext:
    if creds is not None:
        ctx = Credentials(creds.cert_pem, creds.key_pem, ca_pem).client_context()
    else:
        ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def _refused(rig: Rig, ctx: ssl.SSLContext | None, payload: bytes) -> tuple[bytes, Any]:
    """Run the exchange alongside a good call; the server must close, having served nothing."""
    (received, error, peer), _ = await asyncio.gather(
        exchange(rig.port, ctx, payload), rig.good_call()
    )
    assert not isinstance(error, asyncio.TimeoutError), "server kept the connection open"
    await rig.check_after(peer)
    return received, peer


# 1-3, 5: TLS that must not get as far as HTTP/2 ------------------------------------------------


# TLS 1.3 and 1.2 fail a bad client certificate at different points (1.3: after the client
# thinks the handshake is done), so both are tried.
TLS_VERSIONS = pytest.mark.parametrize(
    "tls_max", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"]
)


@TLS_VERSIONS
async def test_client_without_certificate_is_refused(
    rig: Rig, authority: Authority, tls_max: ssl.TLSVersion
) -> None:
    ctx = _context(None, authority.cert_pem, ["h2"])
    ctx.maximum_version = tls_max
    received, _ = await _refused(rig, ctx, poisoned_request())
    assert received == b""


@TLS_VERSIONS
async def test_client_with_certificate_from_another_ca_is_refused(
    rig: Rig, authority: Authority, tls_max: ssl.TLSVersion
) -> None:
    other = Authority.create("evil CA").issue("intruder", ips=["127.0.0.1"])
    ctx = _context(other, authority.cert_pem, ["h2"])
    ctx.maximum_version = tls_max
    received, _ = await _refused(rig, ctx, poisoned_request())
    assert received == b""


@TLS_VERSIONS
async def test_client_with_expired_certificate_is_refused(
    rig: Rig, authority: Authority, tls_max: ssl.TLSVersion
) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = authority.issue(
        "expired", not_before=now - datetime.timedelta(days=2), lifetime=datetime.timedelta(hours=1)
    )
    cert = x509.load_pem_x509_certificate(expired.cert_pem)
    assert cert.not_valid_after_utc < now
    ctx = _context(expired, authority.cert_pem, ["h2"])
    ctx.maximum_version = tls_max
    received, _ = await _refused(rig, ctx, poisoned_request())
    assert received == b""


async def test_a_crowd_of_attackers_at_once(
    rig: Rig, authority: Authority, client_credentials: Credentials
) -> None:
    no_cert = _context(None, authority.cert_pem, ["h2"])
    evil = _context(Authority.create("evil").issue("x"), authority.cert_pem, ["h2"])
    http1 = _context(client_credentials, client_credentials.ca_pem, ["http/1.1"])
    rng = random.Random(7)
    attacks = []
    for i in range(30):
        ctx = (no_cert, evil, http1, None)[i % 4]
        payload = poisoned_request() if ctx is not None else rng.randbytes(3000)
        attacks.append(exchange(rig.port, ctx, payload))
    results = await asyncio.gather(*attacks, *(rig.good_call() for _ in range(10)))
    peers = []
    for i, (received, error, peer) in enumerate(results[:30]):
        assert not isinstance(error, asyncio.TimeoutError)
        if i % 4 != 3:  # TLS attackers get no application data back at all
            assert received == b""
        peers.append(peer)
    await rig.check_after(*peers)


@pytest.mark.parametrize("alpn", [["http/1.1"], []], ids=["alpn-http1.1", "no-alpn"])
async def test_valid_certificate_without_alpn_h2_is_refused(
    rig: Rig, client_credentials: Credentials, alpn: list[str]
) -> None:
    ctx = _context(client_credentials, client_credentials.ca_pem, alpn)
    http1 = (
        b"POST /bigrpc/E.echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-bigrpc-dill\r\n"
        b"Content-Length: %d\r\n\r\n" % len(POISON)
    ) + POISON
    received, _ = await _refused(rig, ctx, http1)
    assert received == b""
    # Nor may it speak HTTP/2 anyway once it has not agreed to it.
    received, _ = await _refused(rig, ctx, poisoned_request())
    assert received == b""


# 4: not TLS at all ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
async def test_plain_tcp_garbage_is_refused(rig: Rig, seed: int) -> None:
    rng = random.Random(seed)
    garbage = rng.randbytes(rng.randrange(1, 20000))
    received, _ = await _refused(rig, None, garbage)
    assert b"HTTP" not in received


async def test_cleartext_http2_to_a_tls_server_is_refused(rig: Rig) -> None:
    received, _ = await _refused(rig, None, poisoned_request())
    assert not parse_frames(received) or goaway_code(parse_frames(received)) is None


# 6: authenticated HTTP/2 peers that break the protocol ---------------------------------------


class H2Peer:
    """An authenticated connection speaking raw bytes, reading raw frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.data = b""
        self.eof = False
        self.peer = writer.get_extra_info("sockname")

    @classmethod
    async def connect(cls, port: int, creds: Credentials, rcvbuf: int = 0) -> H2Peer:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=creds.client_context(), server_hostname="127.0.0.1"
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        return cls(reader, writer)

    @property
    def frames(self) -> list[Frame]:
        return parse_frames(self.data)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until(self, done: Callable[[H2Peer], bool], timeout: float = 5.0) -> None:
        async def run() -> None:
            while not done(self):
                try:
                    chunk = await self.reader.read(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    self.eof = True
                    return
                self.data += chunk

        await asyncio.wait_for(run(), timeout)

    async def read_until_closed(self) -> None:
        await self.read_until(lambda _: False)
        assert self.eof

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def h2peer(rig: Rig, client_credentials: Credentials) -> AsyncIterator[H2Peer]:
    peer = await H2Peer.connect(rig.port, client_credentials)
    try:
        yield peer
    finally:
        await peer.close()


START = PREFACE + SETTINGS_FRAME


def _hpack(headers: list[tuple[bytes, bytes]]) -> bytes:
    import hpack

    data: bytes = hpack.Encoder().encode(headers)
    return data


MALFORMED = {
    # An unknown frame type must be ignored; a SETTINGS frame whose length is not a multiple
    # of 6 is a connection error.
    "bad-type-then-bad-length": frame(0xEE, 0xFF, 1, b"junk") + frame(SETTINGS, 0, 0, b"12345"),
    # A frame header that claims more than the 1 MiB frame size we allow.
    "oversized-frame": frame(DATA, 0, 1, b"", length=(1 << 24) - 1) + b"x" * 1000,
    # A PING must be 8 bytes.
    "short-ping": frame(6, 0, 0, b"abc"),
    "headers-garbage-hpack": frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(range(255, 0, -3))),
    "data-on-stream-0": frame(DATA, END_STREAM, 0, POISON),
    "data-on-idle-stream": frame(DATA, END_STREAM, 7, POISON),
    "headers-on-stream-0": frame(
        HEADERS, END_HEADERS, 0, _hpack(request_headers())
    ),
    "even-stream-id": frame(HEADERS, END_HEADERS, 2, _hpack(request_headers()))
    + frame(DATA, END_STREAM, 2, POISON),
    "continuation-without-headers": frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
    "headers-interrupted": frame(HEADERS, 0, 1, _hpack(request_headers())[:5])
    + frame(DATA, END_STREAM, 1, POISON),
    "rst-stream-0": frame(RST_STREAM, 0, 0, b"\x00\x00\x00\x08"),
    "window-update-zero": frame(8, 0, 0, b"\x00\x00\x00\x00"),
    "uppercase-header": frame(
        HEADERS, END_HEADERS, 1, _hpack([*request_headers(), (b"X-Evil", b"1")])
    )
    + frame(DATA, END_STREAM, 1, POISON),
    "duplicate-pseudo-header": frame(
        HEADERS, END_HEADERS, 1, _hpack([*request_headers(), (b":path", b"/bigrpc/E.echo")])
    )
    + frame(DATA, END_STREAM, 1, POISON),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_frames_close_the_connection(rig: Rig, h2peer: H2Peer, name: str) -> None:
    await h2peer.send(START + MALFORMED[name])
    good = asyncio.ensure_future(rig.good_call())
    try:
        await h2peer.read_until_closed()
    finally:
        await good
    code = goaway_code(h2peer.frames)
    # A stream error (RST_STREAM) would leave the connection up; these are all connection errors.
    assert code is not None and code != ErrorCodes.NO_ERROR, (name, h2peer.frames)
    await rig.check_after(h2peer.peer)


def _status_of(events: list[Any], stream_id: int) -> int | None:
    for event in events:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
            return int(dict(event.headers)[b":status"])
    return None


@pytest.mark.parametrize(
    ("path", "content_type", "status"),
    [
        (b"/evil", wire.CONTENT_TYPE_VALUE, wire.STATUS_BAD_REQUEST),
        (b"/bigrpc/../E.echo", wire.CONTENT_TYPE_VALUE, wire.STATUS_BAD_REQUEST),
        (b"/bigrpc/E.echo", b"text/plain", wire.STATUS_BAD_REQUEST),
        (b"/bigrpc/E.echo", b"", wire.STATUS_BAD_REQUEST),
        (b"/bigrpc/E._private", wire.CONTENT_TYPE_VALUE, wire.STATUS_NOT_FOUND),
        (b"/bigrpc/E.__reduce__", wire.CONTENT_TYPE_VALUE, wire.STATUS_NOT_FOUND),
        (b"/bigrpc/Nope.echo", wire.CONTENT_TYPE_VALUE, wire.STATUS_NOT_FOUND),
        (b"/bigrpc/E." + b"x" * 5000, wire.CONTENT_TYPE_VALUE, wire.STATUS_BAD_REQUEST),
    ],
)
async def test_bad_requests_are_answered_without_unpickling(
    rig: Rig, h2peer: H2Peer, path: bytes, content_type: bytes, status: int
) -> None:
    client = h2_client()
    client.send_headers(1, request_headers(path, content_type))
    client.send_data(1, POISON, end_stream=True)
    await h2peer.send(client.data_to_send())
    events: list[Any] = []

    def answered(peer: H2Peer) -> bool:
        if peer.data:
            events.extend(client.receive_data(peer.data))
            peer.data = b""
        return any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events)

    await h2peer.read_until(answered)
    assert _status_of(events, 1) == status
    # The connection stays up (a bad request is the caller's error, not the link's), but the
    # server holds nothing for it.
    await assert_settles(rig.server, rig.good_peers | {h2peer.peer})
    await rig.good_call()
    await h2peer.close()
    await rig.check_after(h2peer.peer)


async def test_huge_header_block_is_refused(rig: Rig, h2peer: H2Peer) -> None:
    headers = [*request_headers(), (b"x-big", b"v" * (100 * 1024))]
    block = _hpack(headers)
    chunks = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    data = frame(HEADERS, 0, 1, chunks[0])
    for i, chunk in enumerate(chunks[1:], 1):
        data += frame(CONTINUATION, END_HEADERS if i == len(chunks) - 1 else 0, 1, chunk)
    await h2peer.send(START + data + frame(DATA, END_STREAM, 1, POISON))
    await h2peer.read_until_closed()
    assert goaway_code(h2peer.frames) == ErrorCodes.ENHANCE_YOUR_CALM
    await rig.check_after(h2peer.peer)


async def test_endless_header_block_is_cut_off(rig: Rig, h2peer: H2Peer) -> None:
    # CONTINUATION frames that never end the header block: the server must not buffer them
    # while waiting for END_HEADERS (see test_rpc_fuzz for the exact bound).
    await h2peer.send(START + frame(HEADERS, 0, 1, _hpack(request_headers())))
    filler = frame(CONTINUATION, 0, 1, b"\x00" * (256 * 1024))
    sent = 0
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while sent < 64 * 1024 * 1024 and not h2peer.reader.at_eof():
            await h2peer.send(filler)
            sent += len(filler)
            await asyncio.sleep(0)
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await h2peer.read_until_closed()
    assert sent < 64 * 1024 * 1024, "the server took 64 MiB of header block"
    await rig.check_after(h2peer.peer)


async def test_body_shorter_than_declared_then_disconnect(rig: Rig, h2peer: H2Peer) -> None:
    client = h2_client()
    client.send_headers(1, [*request_headers(), (b"content-length", b"10000000")])
    client.send_data(1, POISON[:-1])
    await h2peer.send(client.data_to_send())
    await rig.good_call()
    await _wait_for_streams(rig, h2peer.peer, 1)
    await h2peer.close()
    await rig.check_after(h2peer.peer)


async def test_body_shorter_than_declared_then_end_stream(rig: Rig, h2peer: H2Peer) -> None:
    client = h2_client()
    client.send_headers(1, [*request_headers(), (b"content-length", b"10000000")])
    await h2peer.send(client.data_to_send() + frame(DATA, END_STREAM, 1, POISON))
    await h2peer.read_until_closed()
    assert goaway_code(h2peer.frames) == ErrorCodes.PROTOCOL_ERROR
    await rig.check_after(h2peer.peer)


async def test_body_longer_than_declared(rig: Rig, h2peer: H2Peer) -> None:
    client = h2_client()
    client.send_headers(1, [*request_headers(), (b"content-length", b"3")])
    await h2peer.send(client.data_to_send() + frame(DATA, END_STREAM, 1, POISON))
    await h2peer.read_until_closed()
    assert goaway_code(h2peer.frames) == ErrorCodes.PROTOCOL_ERROR
    await rig.check_after(h2peer.peer)


async def _wait_for_streams(rig: Rig, peer: Any, n: int) -> None:
    """Until the server holds ``n`` open streams for ``peer``."""
    for _ in range(500):
        conns = [c for c in rig.server._connections if c.peer == peer]
        if conns and len(conns[0].streams) == n and len(conns[0].tasks) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never saw the hostile streams")


async def test_streams_that_never_end_are_freed_on_disconnect(rig: Rig, h2peer: H2Peer) -> None:
    client = h2_client()
    client.send_headers(1, request_headers())  # a value call that never ends
    client.send_data(1, POISON)
    client.send_headers(3, request_headers(content_type=wire.CONTENT_TYPE_STREAM))
    client.send_data(3, b"a streamed argument that never ends")
    client.send_headers(5, request_headers())  # headers, and then nothing at all
    await h2peer.send(client.data_to_send())
    await _wait_for_streams(rig, h2peer.peer, 3)
    # Meanwhile the server is not stuck: the good client is served, repeatedly.
    for _ in range(3):
        await rig.good_call()
    await asyncio.sleep(0.2)
    await rig.good_call()
    assert rig.watch.peers.count(h2peer.peer) == 0
    await h2peer.close()
    await rig.check_after(h2peer.peer)


async def test_many_streams_then_reset_all(rig: Rig, h2peer: H2Peer) -> None:
    # Open many half-sent calls, then reset each: every task must go.
    client = h2_client()
    for sid in range(1, 200, 2):
        client.send_headers(sid, request_headers())
        client.send_data(sid, POISON[:3])
    await h2peer.send(client.data_to_send())
    await _wait_for_streams(rig, h2peer.peer, 100)
    for sid in range(1, 200, 2):
        client.reset_stream(sid)
    await h2peer.send(client.data_to_send())
    await rig.good_call()
    await assert_settles(rig.server, rig.good_peers | {h2peer.peer})
    await h2peer.close()
    await rig.check_after(h2peer.peer)


@pytest.mark.parametrize("timeout", [b"1e300", b"3600"])
async def test_call_deadline_does_not_keep_a_closed_connection(
    rig: Rig, h2peer: H2Peer, timeout: bytes
) -> None:
    # A call's deadline timer must not outlive the call: with a far deadline it would otherwise
    # keep the connection (and everything it holds) alive long after the peer has gone.
    client = h2_client()
    for sid, path in ((1, b"/bigrpc/E.nope"), (3, b"/bigrpc/E.echo")):
        client.send_headers(sid, [*request_headers(path), (b"bigrpc-timeout", timeout)])
    client.end_stream(1)
    await h2peer.send(client.data_to_send())
    await _wait_for_streams(rig, h2peer.peer, 1)  # stream 1 answered, stream 3 waits for its body
    conn = next(c for c in rig.server._connections if c.peer == h2peer.peer)
    ref = weakref.ref(conn)
    del conn
    await h2peer.close()
    await rig.check_after(h2peer.peer)
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())


async def test_peer_that_sends_but_never_reads_is_dropped(
    rig: Rig, client_credentials: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every PING makes the server owe an ACK; a peer that never reads them would otherwise make
    # it buffer without bound. (The real bound is 128 MiB; a smaller one keeps the test quick.)
    monkeypatch.setattr(connection_module, "MAX_WRITE_BACKLOG", 256 * 1024)
    peer = await H2Peer.connect(rig.port, client_credentials, rcvbuf=4096)
    try:
        pings = frame(PING, 0, 0, b"12345678") * 5000
        await peer.send(START)
        await _wait_for_streams(rig, peer.peer, 0)
        sent = 0
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while sent < 32 * 1024 * 1024:
                await peer.send(pings)  # and never read
                sent += len(pings)
                # drain() returns without yielding while the peer's transport is not paused,
                # as when its socket already failed because the server dropped it: let the
                # server's loop run, or this loop would spin to the end without seeing that.
                await asyncio.sleep(0)
                if not any(c.peer == peer.peer for c in rig.server._connections):
                    break
        assert sent < 32 * 1024 * 1024, "the server kept buffering for a peer that does not read"
    finally:
        await peer.close()
    await rig.check_after(peer.peer)
