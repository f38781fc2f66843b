"""A pool's record streams over one Unix socket, for a machine on the driver's host.

Over the network, a pool's driver feeds a machine :class:`bigpool.pool_wire.Chunk` records on
one long-lived HTTP/2 stream (``submit_stream``) and reads result records on another
(``results``): every record pays for TLS and h2 framing, in the driver's loop and in the
machine. A machine that shares the driver's host (it found the pool's shared-memory probe,
:mod:`bigpool.pool_shm`) carries both on one Unix socket instead, made in the pool's private
directory (mode 0700): the same records, with nothing around them. Roughly half the CPU that
the driver's loop and the machine spend on a small task was TLS and h2 (the measurement is in
``docs/benchmarks.md``).

Opening one: the driver makes a random token and hands it to the machine over the mutual-TLS
connection; the machine listens on a new socket (:func:`listen_once`) and answers its path;
the driver connects (:func:`connect`) and sends the token first. The machine takes the first
connection that presents the token within :data:`ACCEPT_TIMEOUT` seconds, then closes the
listener and removes the path; a connection that presents anything else is closed.

A :class:`RecordChannel` is one end. It has the parts of :class:`bigpool.h2rpc.StreamReader`
(``read_chunk_nowait``, ``on_arrival``) and :class:`bigpool.h2rpc.StreamWriter` (``write``,
``flush``, ``close``, ``closed``, ``failed``) that the pool's two ends use, so each end runs the
same code over either transport.

This module runs on machines and drivers; it imports the standard library only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import os
from collections.abc import Callable
from typing import cast

__all__ = ["ACCEPT_TIMEOUT", "TOKEN_BYTES", "ChannelBrokenError", "Listener", "RecordChannel",
           "connect", "listen_once"]

_log = logging.getLogger(__name__)

# How long a machine's listener waits for the driver to connect and present its token.
ACCEPT_TIMEOUT = 30.0
# The token's length: what the driver sends first on the socket.
TOKEN_BYTES = 32


class ChannelBrokenError(ConnectionError):
    """The channel's socket closed before the peer ended its records."""


class RecordChannel(asyncio.Protocol):
    """One end of a record channel: bytes in as they arrive, bytes out at the end of the
    loop's turn (or at :meth:`flush`).

    Reading: :meth:`read_chunk_nowait` gives what has arrived, ``b""`` once the peer has ended
    its side, ``None`` while nothing has arrived, and raises :class:`ChannelBrokenError` if the
    socket closed without that end. :meth:`on_arrival` calls back on the loop, in the socket's
    own callback, when any of those arrives.

    Writing: :meth:`write` queues bytes-like objects (which must not change until sent);
    :meth:`close` ends this side once they are sent; after the socket fails, ``failed`` holds
    the error and writes are dropped. :meth:`abort` closes the socket both ways at once.

    ``token``: for the listening end, the bytes a connection must begin with before it counts
    as open (``on_open(channel)`` is then called once); a connection that sends anything else
    is closed.
    """

    def __init__(self, token: bytes | None = None,
                 on_open: Callable[[RecordChannel], None] | None = None) -> None:
        self._token = token
        self._token_seen = b""
        self._on_open = on_open
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._received: collections.deque[bytes] = collections.deque()
        self._ended = False
        self._broken: BaseException | None = None
        self._listener: Callable[[], None] | None = None
        self._outgoing: list[bytes | bytearray | memoryview] = []
        self._flush_handle: asyncio.Handle | None = None
        self._closed = False
        self.failed: BaseException | None = None
        self.bytes_read = 0

    def __repr__(self) -> str:
        state = ("failed" if self.failed else "closed" if self._closed else
                 "open" if self._transport is not None else "unconnected")
        return f"<RecordChannel {state} read={self.bytes_read}>"

    # asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        if self._closed:  # aborted before it connected
            self._transport.abort()
            return
        if self._token is None and self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        if self._token is not None:
            data = self._check_token(data)
            if not data:
                return
        self.bytes_read += len(data)
        self._received.append(data)
        self._notify()

    def _check_token(self, data: bytes) -> bytes:
        """Take the token off the front of ``data``; what follows it (``b""`` while it is
        still arriving, or after a wrong token, which closes the connection)."""
        assert self._token is not None and self._transport is not None
        seen = self._token_seen + data
        need = len(self._token)
        if len(seen) < need:
            if not self._token.startswith(seen):
                self._refuse()
            else:
                self._token_seen = seen
            return b""
        if not hmac.compare_digest(seen[:need], self._token):
            self._refuse()
            return b""
        self._token = None
        self._token_seen = b""
        on_open, self._on_open = self._on_open, None
        if on_open is not None:
            on_open(self)
        return seen[need:]

    def _refuse(self) -> None:
        _log.warning("closed a pool channel connection that did not present the pool's token")
        self._token_seen = b""
        self._on_open = None
        assert self._transport is not None
        self._transport.abort()

    def eof_received(self) -> bool:
        if self._token is not None:
            return False  # never opened: close it
        self._ended = True
        self._notify()
        return True  # keep this side open until it is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ended and self._broken is None:
            self._broken = ChannelBrokenError(
                "the pool channel's socket closed" + (f": {exc}" if exc else ""))
        if self.failed is None:
            self.failed = exc or ChannelBrokenError("the pool channel's socket closed")
        self._outgoing.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._notify()

    # reading ------------------------------------------------------------------------------

    def read_chunk_nowait(self) -> bytes | None:
        """The next bytes that arrived; ``b""`` once the peer ended its side; ``None`` while
        nothing has arrived. Raises :class:`ChannelBrokenError` if the socket closed first."""
        if self._received:
            return self._received.popleft()
        if self._ended:
            return b""
        if self._broken is not None:
            raise self._broken
        return None

    def on_arrival(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` whenever bytes, the end or a failure arrive (``None`` stops it);
        soon after this too if something is waiting already. It reads with
        :meth:`read_chunk_nowait`; what it raises is logged and dropped."""
        self._listener = callback
        if callback is not None and (self._received or self._ended or self._broken):
            asyncio.get_running_loop().call_soon(self._notify)

    def _notify(self) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            listener()
        except Exception:
            _log.exception("a pool channel's reader failed")

    # writing ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` after what was written before, at the end of the loop's turn.

        Raises ``ValueError`` after :meth:`close` and ``TypeError`` for anything but bytes."""
        if self._closed:
            raise ValueError("write to a closed RecordChannel")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"a RecordChannel takes bytes, not {type(data).__name__}")
        if self.failed is not None or not data:
            return
        self._outgoing.append(data)
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand what was written to the socket now (small pieces joined into one write)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        outgoing = self._outgoing
        transport = self._transport
        if not outgoing or transport is None or self.failed is not None:
            return
        self._outgoing = []
        try:
            if len(outgoing) == 1:
                transport.write(outgoing[0])
            else:
                transport.writelines(outgoing)
        except Exception as exc:  # the socket is closing: the peer sees it end
            self.failed = exc

    def close(self) -> None:
        """End this side once what was written is sent (the peer reads ``b""``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        transport = self._transport
        if transport is not None and self.failed is None and not transport.is_closing():
            with contextlib.suppress(Exception):
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()

    def abort(self) -> None:
        """Close the socket both ways now, dropping what is not yet sent; a reader sees it
        broken (unless the peer had ended its side). Idempotent."""
        self._closed = True
        self._outgoing.clear()
        transport = self._transport
        if transport is not None:
            transport.abort()


class Listener:
    """A machine's socket waiting for the driver's one connection (see :func:`listen_once`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.unopened: set[RecordChannel] = set()  # connections still to present the token
        self.closed = False

    def close(self) -> None:
        """Stop listening, drop connections that have not presented the token, and remove
        the path. Idempotent."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.server is not None:
            self.server.close()
        for channel in self.unopened:
            channel.abort()
        self.unopened.clear()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def listen_once(directory: str, token: bytes, on_open: Callable[[RecordChannel], None],
                      timeout: float = ACCEPT_TIMEOUT) -> Listener:
    """Listen on a new Unix socket in ``directory`` for one connection that presents
    ``token``. ``on_open(channel)`` is called with that connection's channel; the listener
    closes (and its path is removed) then, or after ``timeout`` seconds. Raises ``OSError`` if
    the socket cannot be made and ``ValueError`` for a token shorter than
    :data:`TOKEN_BYTES`."""
    if not isinstance(token, bytes) or len(token) < TOKEN_BYTES:
        raise ValueError(f"a pool channel's token is at least {TOKEN_BYTES} bytes")
    loop = asyncio.get_running_loop()
    listener = Listener(os.path.join(directory, f"c{os.getpid()}-{os.urandom(6).hex()}"))

    def accepted(channel: RecordChannel) -> None:
        listener.unopened.discard(channel)
        if listener.closed:  # one connection only
            channel.abort()
            return
        listener.close()
        on_open(channel)

    def make_channel() -> RecordChannel:
        channel = RecordChannel(token=token, on_open=accepted)
        if listener.closed:
            channel.abort()
        else:
            listener.unopened.add(channel)
        return channel

    listener.server = await loop.create_unix_server(make_channel, listener.path)
    listener.timer = loop.call_later(timeout, listener.close)
    return listener


async def connect(path: str, token: bytes) -> RecordChannel:
    """Connect to a machine's :func:`listen_once` socket at ``path`` and present ``token``.
    Raises ``OSError`` if the socket cannot be reached."""
    _, channel = await asyncio.get_running_loop().create_unix_connection(RecordChannel, path)
    channel.write(token)
    channel.flush()
    return channel
