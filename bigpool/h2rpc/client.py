"""The RPC client: calls methods on peers over one multiplexed HTTP/2 connection per address.

Calls to the same address share a connection, opened on first use and replaced when it
breaks. When the peer's limit on concurrent streams is reached, further calls wait their turn
rather than fail. Every failure of the transport surfaces as :class:`NetworkError` (marked
temporary); exceptions raised by the remote method surface as themselves.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any

import h2.events
from h2.errors import ErrorCodes

from . import wire
from .connection import H2Connection, InboundStream
from .errors import (
    CallTimeoutError,
    ConnectionLostError,
    NetworkError,
    StreamBrokenError,
)
from .streams import StreamReader, StreamWriter, iterate_body

__all__ = ["Client", "parse_address"]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024 * 1024

# Request paths of method names already checked (wire.method_path parses and validates each
# one): a small saving on every call, bounded so that made-up names cannot grow it forever.
_PATHS: dict[str, bytes] = {}
_MAX_CACHED_PATHS = 4096


def parse_address(addr: str) -> tuple[str, int]:
    """``(host, port)`` from ``"host:port"``, ``"[v6]:port"`` or ``"https://host:port/"``.

    Raises ``ValueError`` naming the address when it has no port.
    """
    text = addr.strip()
    for prefix in ("https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {addr!r} is not of the form host:port") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"address {addr!r} is not of the form host:port")
    return host, port


class ClientConnection(H2Connection):
    """One connection to a server; streams wait here for a free slot under the peer's limit."""

    def __init__(self, addr: str) -> None:
        super().__init__(client_side=True, max_concurrent_streams=16)
        self.addr = addr
        self.authority = addr.encode("ascii")
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closing = False

    @property
    def usable(self) -> bool:
        return self.closed is None and not self._closing

    def _has_slot(self) -> bool:
        return len(self.streams) < self.h2.remote_settings.max_concurrent_streams

    async def open_stream(self, headers: wire.Headers, *, end_stream: bool) -> InboundStream:
        """Start a request, waiting for a free stream slot if the peer's limit is reached."""
        while not self._has_slot() or self._slot_waiters:
            self._check_open()
            waiter = self.loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
                self._pass_slot()
                raise
            if self._has_slot():
                break
        self._check_open()
        stream_id = self.h2.get_next_available_stream_id()
        stream = InboundStream(self, stream_id)
        self.streams[stream_id] = stream
        try:
            self.send_headers(stream_id, headers, end_stream=end_stream)
        except BaseException:
            self.streams.pop(stream_id, None)
            raise
        return stream

    def _pass_slot(self) -> None:
        while self._slot_waiters and self._has_slot():
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def stream_closed(self, stream: InboundStream) -> None:
        self._pass_slot()

    def settings_changed(self) -> None:
        self._pass_slot()

    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.headers = list(event.headers)
                stream._wake()
        else:
            super().handle_event(event)

    def stream_reset(self, stream: InboundStream, error_code: int | None) -> None:
        if error_code == ErrorCodes.REFUSED_STREAM:
            # The server did not start the call: safe to try again.
            stream.reset_code = error_code
            stream.fail(NetworkError("peer refused the stream", addr=self.addr))
            self.stream_closed(stream)
        else:
            super().stream_reset(stream, error_code)

    def connection_terminated(self, event: h2.events.ConnectionTerminated) -> None:
        self._closing = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        error = ConnectionLostError(
            f"server went away (GOAWAY {event.error_code!s}); call not processed", addr=self.addr
        )
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                stream.fail(error)
        if not self.streams or event.error_code != ErrorCodes.NO_ERROR:
            super().connection_terminated(event)

    def on_closed(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _consume_outcome(call: asyncio.Future[Any]) -> None:
    """Mark a timed call's outcome as seen. When the caller is cancelled at the moment the
    call fails (a refused connection, say), Python 3.11's ``wait_for`` cancels the call, gets
    its error instead of a cancellation, and drops it: asyncio would then log "Task exception
    was never retrieved" for an error nobody is waiting for any more."""
    if not call.cancelled():
        call.exception()


class Client:
    """Calls RPC methods on peers, over mutual TLS when given a context.

    ``ssl_context`` should come from :meth:`Credentials.client_context`: it presents our leaf
    certificate and checks the server's against the cluster's authority and the host dialled.
    ``None`` speaks cleartext HTTP/2, which is only for tests of the protocol itself.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self._connections: dict[str, ClientConnection] = {}
        self._connecting: dict[str, asyncio.Future[ClientConnection]] = {}
        self._closed = False

    async def call(
        self, addr: str, service_method: str, arg: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Call ``service_method`` (``"Service.method"``) at ``addr`` with ``arg``; its reply.

        A streamed reply comes back as a :class:`StreamReader`. ``timeout`` (seconds) bounds
        the call up to its reply (for a streamed reply, up to the reply's start); when it
        passes, the call is cancelled at the server and :class:`CallTimeoutError` is raised.
        Cancelling the awaiting task cancels the call at the server as well.
        """
        if timeout is None:
            return await self._call(addr, service_method, arg, None)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        call = asyncio.ensure_future(self._call(addr, service_method, arg, timeout))
        call.add_done_callback(_consume_outcome)
        try:
            return await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            raise CallTimeoutError(service_method, timeout) from None

    async def _call(self, addr: str, service_method: str, arg: Any, timeout: float | None) -> Any:
        path = _PATHS.get(service_method)
        if path is None:
            path = wire.method_path(service_method)
            if len(_PATHS) < _MAX_CACHED_PATHS:
                _PATHS[service_method] = path
        streamed = isinstance(arg, StreamWriter) or wire.is_streamed(arg)
        body = None if streamed or arg is None else wire.encode_value(arg)
        conn = await self.connection(addr)
        headers = wire.request_headers(conn.authority, path, streamed=streamed, timeout=timeout)
        try:
            stream = await conn.open_stream(headers, end_stream=body is None and not streamed)
        except (ConnectionLostError, OSError) as exc:
            raise _network_error(addr, exc) from exc
        returned = False
        try:
            try:
                if streamed:
                    await self._send_stream(conn, stream, arg)
                elif body is not None:
                    await conn.send_data(stream.id, body, end_stream=True)
            except StreamBrokenError:
                if stream.headers is None:
                    raise
                # The server replied before taking the whole argument, then stopped it.
            result = await self._read_reply(conn, stream, service_method)
            returned = True
            return result
        except ConnectionLostError as exc:
            raise _network_error(addr, exc) from exc
        except StreamBrokenError as exc:
            if conn.closed is not None:
                raise _network_error(addr, conn.closed) from exc
            if timeout is not None and stream.reset_code == ErrorCodes.CANCEL:
                # The server's copy of our deadline fired a moment before ours.
                raise CallTimeoutError(service_method, timeout) from None
            raise
        finally:
            if not returned and not stream.finished:
                conn.reset_stream(stream.id, ErrorCodes.CANCEL)

    async def _send_stream(self, conn: ClientConnection, stream: InboundStream, body: Any) -> None:
        if isinstance(body, StreamWriter):
            try:
                await body.send_on(conn, stream.id, stream)
            except StreamBrokenError:
                if stream.headers is None:
                    raise
                return  # the server answered before taking the whole stream
            if body.aborted is not None:
                raise body.aborted
            conn.end_stream(stream.id, wire.ok_trailers())
            return
        async for chunk in iterate_body(body, _blocking_executor()):
            if stream.finished:
                # The server answered (an error, most likely) before taking the whole stream.
                return
            if chunk:
                await conn.send_data(stream.id, chunk, end_stream=False)
        conn.end_stream(stream.id, wire.ok_trailers())

    async def _read_reply(self, conn: ClientConnection, stream: InboundStream, name: str) -> Any:
        headers = await stream.wait_headers()
        status, content_type = wire.parse_response(headers)
        if status == wire.STATUS_OK and content_type == wire.CONTENT_TYPE_STREAM:
            return StreamReader(stream, f"reply of {name} from {conn.addr}")
        body = await stream.read_all(self.max_message_size)
        if status == wire.STATUS_OK and content_type == wire.CONTENT_TYPE_VALUE:
            return wire.decode_value(body) if body else None
        raise wire.response_error(status, content_type, body)

    async def connection(self, addr: str) -> ClientConnection:
        """The open connection to ``addr``, connecting (once, however many ask) if needed."""
        conn = self._connections.get(addr)
        if conn is not None and conn.usable:
            return conn
        if self._closed:
            raise NetworkError("client is closed", addr=addr)
        pending = self._connecting.get(addr)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._connecting[addr] = pending
            try:
                conn = await self._connect(addr)
                if self.is_closed():
                    # close() ran while we were connecting: it could not close this one.
                    conn.close()
                    raise NetworkError("client is closed", addr=addr)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()
                raise
            finally:
                del self._connecting[addr]
            self._connections[addr] = conn
            pending.set_result(conn)
            return conn
        return await asyncio.shield(pending)

    async def _connect(self, addr: str) -> ClientConnection:
        host, port = parse_address(addr)
        loop = asyncio.get_running_loop()
        canonical = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: ClientConnection(canonical),
                    host,
                    port,
                    ssl=self._ssl,
                    server_hostname=host if self._ssl is not None else None,
                ),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise NetworkError(f"connect timed out after {self.connect_timeout:g}s", addr=addr) from None
        except ssl.SSLError as exc:
            raise NetworkError(f"TLS handshake failed: {exc}", addr=addr) from exc
        except OSError as exc:
            raise NetworkError(f"cannot connect: {exc}", addr=addr) from exc
        if self._ssl is not None:
            ssl_object = conn.transport.get_extra_info("ssl_object") if conn.transport else None
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                conn.close()
                raise NetworkError("peer does not speak HTTP/2 (ALPN h2)", addr=addr)
        return conn

    def is_closed(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called."""
        return self._closed

    async def close(self) -> None:
        """Close every connection; calls still running fail with :class:`NetworkError`."""
        self._closed = True
        conns = list(self._connections.values())
        self._connections.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            await conn.closed_event.wait()

    def abort(self) -> None:
        """Cut every connection at once (no goodbye); for a process that is going away."""
        self._closed = True
        conns = list(self._connections.values())
        self._connections.clear()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()

    def disconnect(self, addr: str) -> None:
        """Drop the connection to ``addr`` (calls on it fail); the next call reconnects."""
        conn = self._connections.pop(addr, None)
        if conn is not None:
            conn.abort(ConnectionLostError("disconnected by the caller", addr=addr))


def _network_error(addr: str, exc: BaseException) -> NetworkError:
    if isinstance(exc, NetworkError):
        return exc
    return NetworkError(str(exc) or type(exc).__name__, addr=addr)


_executor: Any = None


def _blocking_executor() -> Any:
    """Threads for reading the caller's files and iterators off the event loop."""
    global _executor
    if _executor is None:
        import concurrent.futures

        _executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="bigrpc-stream"
        )
    return _executor

