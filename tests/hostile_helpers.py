"""Tools for the hostile-peer and fuzz tests: raw HTTP/2 frames, a watch on unpickling, and
checks that a server has let go of everything a peer made it hold."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import ssl
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dill
import h2.config
import h2.connection
import pytest

from bigpool.h2rpc import Server, wire
from bigpool.h2rpc import errors as errors_module
from bigpool.h2rpc import server as server_module

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113, section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(ftype: int, flags: int, stream_id: int, payload: bytes, length: int | None = None) -> bytes:
    """One raw frame; ``length`` overrides the true payload length to make a lying header."""
    n = len(payload) if length is None else length
    return (
        n.to_bytes(3, "big")
        + bytes([ftype, flags])
        + (stream_id & 0x7FFFFFFF).to_bytes(4, "big")
        + payload
    )


SETTINGS_FRAME = frame(SETTINGS, 0, 0, b"")
SETTINGS_ACK = frame(SETTINGS, 0x1, 0, b"")


@dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes


def parse_frames(data: bytes) -> list[Frame]:
    """The frames in what a server sent (after its preface), ignoring a cut-off last one."""
    frames = []
    pos = 0
    while pos + 9 <= len(data):
        n = int.from_bytes(data[pos : pos + 3], "big")
        if pos + 9 + n > len(data):
            break
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append(Frame(data[pos + 3], data[pos + 4], sid, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return frames


def goaway_code(frames: Iterable[Frame]) -> int | None:
    for f in frames:
        if f.type == GOAWAY:
            return int.from_bytes(f.payload[4:8], "big")
    return None


def h2_client() -> h2.connection.H2Connection:
    """A sans-IO h2 client that will send whatever headers it is given."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    conn.initiate_connection()
    return conn


POISONED: list[str] = []


def _poisoned() -> None:
    POISONED.append("unpickled")


class Poison:
    """Pickles to a call of :func:`_poisoned`: unpickling it anywhere leaves a mark."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_poisoned, ())


POISON = pickle.dumps(Poison())


def request_headers(
    path: bytes = b"/bigrpc/E.echo", content_type: bytes = wire.CONTENT_TYPE_VALUE
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", path),
        (b"content-type", content_type),
    ]


def poisoned_request() -> bytes:
    """A complete, valid h2 connection start and call of ``E.echo`` whose argument is poison."""
    conn = h2_client()
    conn.send_headers(1, request_headers())
    conn.send_data(1, POISON, end_stream=True)
    data: bytes = conn.data_to_send()
    return data


_NOT_SERVER = object()


class DecodeWatch:
    """Records every unpickling the server does, as the peer address of its connection.

    ``wire.decode_value``, ``dill.loads`` and ``pickle.loads`` are wrapped; a call counts as the
    server's when a frame of ``bigpool/h2rpc/server.py`` is on the stack, and is filed under the
    ``peer`` of the ``conn`` that frame holds. Two kinds of call are not the server reading a
    peer's bytes and are left out: the test's own client unpickling replies (no server frame),
    and ``errors.encode_error`` checking that the server's own error envelope round-trips.
    Any unpickling at all of bytes containing :data:`POISON` is recorded in ``poison``.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.peers: list[Any] = []
        self.poison = 0
        for owner, name in ((wire, "decode_value"), (dill, "loads"), (pickle, "loads")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counting(data: Any, *args: Any, **kwargs: Any) -> Any:
            if POISON in bytes(data):
                self.poison += 1
            peer = _server_peer(sys._getframe(1))
            if peer is not _NOT_SERVER:
                self.peers.append(peer)
            return original(data, *args, **kwargs)

        return counting

    @property
    def count(self) -> int:
        return len(self.peers)


def _server_peer(frame: Any) -> Any:
    while frame is not None:
        code = frame.f_code
        if code.co_name == "encode_error" and code.co_filename == errors_module.__file__:
            return _NOT_SERVER
        if code.co_filename == server_module.__file__:
            conn = frame.f_locals.get("conn")
            return getattr(conn, "peer", "<server, unknown connection>")
        frame = frame.f_back
    return _NOT_SERVER


def handle_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running a call on the server."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "Server.handle"
    ]


def leaks(server: Server, peers: set[Any]) -> list[str]:
    """What the server still holds beyond idle connections from ``peers``."""
    found = []
    for conn in list(server._connections):
        if conn.peer not in peers:
            found.append(f"connection from {conn.peer}")
        if conn.tasks or conn.calls:
            found.append(f"{conn.peer}: tasks {sorted(conn.tasks)}, calls {sorted(conn.calls)}")
        if conn.streams:
            found.append(f"{conn.peer}: streams {sorted(conn.streams)}")
    found += [f"running {t!r}" for t in handle_tasks()]
    return found


async def assert_settles(server: Server, peers: set[Any], timeout: float = 5.0) -> None:
    """Wait until the server holds nothing beyond idle connections from ``peers``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while found := leaks(server, peers):
        if loop.time() > end:
            raise AssertionError(f"server did not let go within {timeout}s: {found}")
        await asyncio.sleep(0.01)


async def exchange(
    port: int,
    ctx: ssl.SSLContext | None,
    payload: bytes,
    *,
    timeout: float = 5.0,
) -> tuple[bytes, BaseException | None, Any]:
    """Connect (TLS if ``ctx``), send ``payload``, read until the server closes.

    Returns what was read, the error that ended the exchange (if any) and our socket's address
    (the server's ``peer`` for this connection, or None if the connection never opened).
    """
    received = bytearray()
    sockname = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
            ),
            timeout,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        return b"", exc, None
    sockname = writer.get_extra_info("sockname")
    error: BaseException | None = None

    async def read_all() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    try:
        writer.write(payload)
        await asyncio.wait_for(read_all(), timeout)
    except (OSError, EOFError, asyncio.TimeoutError) as exc:
        error = exc
    finally:
        writer.close()
        with contextlib.suppress(OSError, EOFError):
            await writer.wait_closed()
    return bytes(received), error, sockname
