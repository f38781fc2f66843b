"""The RPC server: serves ``POST /bigrpc/<Service>.<method>`` for registered objects.

A service is any object registered under a name; its public methods (no leading underscore)
are callable remotely with one argument. ``async def`` methods run on the event loop; plain
methods run in a thread pool so they cannot stall it. Either may learn about its call, and
whether the caller has given up on it, through :func:`current_call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.events
from h2.errors import ErrorCodes

from . import wire
from .connection import H2Connection, InboundStream
from .errors import BadRequestError, MethodNotFoundError, ProtocolError, StreamBrokenError
from .streams import StreamReader, StreamWriter, SyncStreamReader, iterate_body

__all__ = ["CallContext", "Server", "current_call"]

# Largest non-streamed argument accepted; larger data should be streamed.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024 * 1024
# Thread-run methods may block (sleep, I/O, waiting on others): allow many at once.
DEFAULT_MAX_THREADS = 256
# A peer that has not finished the TLS handshake by then is dropped: how long a stranger can
# hold a connection (and its file descriptor) while saying nothing. asyncio's default is 60 s;
# a real handshake, even across continents, takes well under a second.
HANDSHAKE_TIMEOUT = 10.0


@dataclass
class CallContext:
    """What a running method may know about its call.

    ``cancelled`` is set when the caller cancels, times out or disconnects; a long thread-run
    method should check it (``current_call().cancelled.is_set()``) and stop early.
    """

    service: str
    method: str
    deadline: float | None
    peer: Any
    peer_certificate: dict[str, Any] | None
    streamed: bool = False
    # Made on first use: most calls finish without anyone asking (a threading.Event, with its
    # Condition and lock, cost ~2% of a small call's server CPU when made for every call).
    _cancelled: threading.Event | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cancelled(self) -> threading.Event:
        """Set when the caller cancels, times out or disconnects."""
        event = self._cancelled
        if event is None:
            with _cancelled_lock:  # the loop thread and a method's thread may both ask first
                event = self._cancelled
                if event is None:
                    event = self._cancelled = threading.Event()
        return event

    @property
    def name(self) -> str:
        return f"{self.service}.{self.method}"


_cancelled_lock = threading.Lock()

_current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("bigrpc_call")


def current_call() -> CallContext:
    """The :class:`CallContext` of the RPC this code runs in; ``LookupError`` outside one."""
    return _current_call.get()


@dataclass(frozen=True)
class _Method:
    function: Callable[..., Any]
    is_coroutine: bool
    takes_argument: bool


def _describe_method(function: Callable[..., Any]) -> _Method:
    is_coroutine = inspect.iscoroutinefunction(function)
    takes_argument = True
    try:
        params = [
            p for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        takes_argument = bool(params)
    except (TypeError, ValueError):
        pass
    return _Method(function, is_coroutine, takes_argument)


class Server:
    """Serves registered services over HTTP/2 with mutual TLS.

    ``ssl_context`` should come from :meth:`Credentials.server_context`, which demands a client
    certificate signed by the cluster's authority. ``None`` serves cleartext HTTP/2, which is
    only for tests of the protocol itself.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None,
        *,
        max_concurrent_streams: int = 1024,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_threads: int = DEFAULT_MAX_THREADS,
    ) -> None:
        if max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be positive, not {max_concurrent_streams}")
        self._ssl = ssl_context
        self._services: dict[str, object] = {}
        self._methods: dict[tuple[str, str], _Method] = {}
        self.max_concurrent_streams = max_concurrent_streams
        self.max_message_size = max_message_size
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="bigrpc-method"
        )
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[ServerConnection] = set()
        self.address: tuple[str, int] | None = None

    # registry -----------------------------------------------------------------------------

    def register(self, name: str, service: object) -> None:
        """Serve ``service``'s public methods as ``name.<method>``.

        Raises ``ValueError`` for a name that cannot appear in a path or is already taken.
        """
        if not name or "." in name or "/" in name or not name.isascii() or not name.isprintable():
            raise ValueError(f"service name {name!r} must be non-empty ASCII without '.' or '/'")
        if name in self._services:
            raise ValueError(f"a service named {name!r} is already registered")
        self._services[name] = service

    def unregister(self, name: str) -> None:
        self._services.pop(name, None)
        for key in [k for k in self._methods if k[0] == name]:
            del self._methods[key]

    @property
    def services(self) -> dict[str, object]:
        return dict(self._services)

    def lookup(self, service: str, method: str) -> _Method:
        key = (service, method)
        found = self._methods.get(key)
        if found is not None:
            return found
        obj = self._services.get(service)
        if obj is None:
            known = ", ".join(sorted(self._services)) or "none"
            raise MethodNotFoundError(f"no service {service!r} (services: {known})")
        function = None if method.startswith("_") else getattr(obj, method, None)
        if function is None or not callable(function):
            raise MethodNotFoundError(f"service {service!r} has no method {method!r}")
        found = _describe_method(function)
        self._methods[key] = found
        return found

    # lifecycle ----------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: Any = None
    ) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0 picks a free one) or on ``sock``; returns the address."""
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {"ssl": self._ssl}
        if self._ssl is not None:
            tls["ssl_handshake_timeout"] = HANDSHAKE_TIMEOUT
        if sock is not None:
            self._server = await loop.create_server(self._make_protocol, sock=sock, **tls)
        else:
            self._server = await loop.create_server(
                self._make_protocol, host=host, port=port, **tls
            )
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    def _make_protocol(self) -> ServerConnection:
        return ServerConnection(self)

    async def close(self) -> None:
        """Stop listening, close every connection (cancelling calls) and stop the threads."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close()
        for conn in list(self._connections):
            await conn.closed_event.wait()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def abort(self) -> None:
        """Stop at once, as a crashed process would: no GOAWAY, connections cut, calls cancelled."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # dispatch -----------------------------------------------------------------------------

    async def handle(self, conn: ServerConnection, stream: InboundStream, call: CallContext | None,
                     request_error: BaseException | None) -> None:
        """Run one call and send its reply; the task the connection made for the stream."""
        try:
            if request_error is not None:
                raise request_error
            assert call is not None
            _current_call.set(call)
            method = self.lookup(call.service, call.method)
            arg = await self._read_argument(conn, stream, method, call)
            result = await self._invoke(method, arg, call)
        except asyncio.CancelledError:
            call_cancelled(call)
            conn.reset_stream(stream.id, ErrorCodes.CANCEL)
            raise
        except MethodNotFoundError as exc:
            await self._reply_error(conn, stream, wire.STATUS_NOT_FOUND, exc)
            return
        except (BadRequestError, _BadArgumentError) as exc:
            await self._reply_error(conn, stream, wire.STATUS_BAD_REQUEST, exc)
            return
        except StreamBrokenError:
            # The caller gave up on its streamed argument; nobody is listening for a reply.
            call_cancelled(call)
            conn.reset_stream(stream.id, ErrorCodes.CANCEL)
            return
        except Exception as exc:
            await self._reply_error(conn, stream, wire.STATUS_REMOTE_ERROR, exc)
            return
        try:
            await self._reply(conn, stream, result, call)
        except asyncio.CancelledError:
            call_cancelled(call)
            conn.reset_stream(stream.id, ErrorCodes.CANCEL)
            raise
        except (StreamBrokenError, ConnectionError, ProtocolError):
            conn.reset_stream(stream.id, ErrorCodes.CANCEL)
        except Exception:
            conn.reset_stream(stream.id, ErrorCodes.INTERNAL_ERROR)

    async def _read_argument(
        self, conn: ServerConnection, stream: InboundStream, method: _Method, call: CallContext
    ) -> Any:
        if call.streamed:
            reader = StreamReader(stream, f"argument of {call.name}")
            if method.is_coroutine:
                return reader
            return SyncStreamReader(reader, conn.loop)
        try:
            body = await stream.read_all(self.max_message_size)
        except ProtocolError as exc:
            raise BadRequestError(f"argument of {call.name}: {exc}") from None
        if not body:
            return None
        try:
            return wire.decode_value(body)
        except Exception as exc:
            raise _BadArgumentError(
                f"argument of {call.name} could not be unpickled: {type(exc).__name__}: {exc}"
            ) from None

    async def _invoke(self, method: _Method, arg: Any, call: CallContext) -> Any:
        args = (arg,) if method.takes_argument else ()
        if not method.takes_argument and arg is not None:
            raise TypeError(f"{call.name} takes no argument, but one was given")
        if method.is_coroutine:
            return await method.function(*args)
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self._executor, ctx.run, method.function, *args)

    async def _reply(
        self, conn: ServerConnection, stream: InboundStream, result: Any, call: CallContext
    ) -> None:
        if isinstance(result, StreamReader | SyncStreamReader | StreamWriter) or wire.is_streamed(
            result
        ):
            await self._reply_stream(conn, stream, result, call)
            return
        try:
            body = wire.encode_value(result)
        except Exception as exc:
            await self._reply_error(
                conn, stream, wire.STATUS_REMOTE_ERROR,
                _ReplyEncodingError(
                    f"reply of {call.name} could not be pickled: {type(exc).__name__}: {exc}"
                ),
            )
            return
        conn.send_headers(stream.id, wire.response_headers(wire.STATUS_OK, wire.CONTENT_TYPE_VALUE))
        await conn.send_data(stream.id, body, end_stream=True)

    async def _reply_stream(
        self, conn: ServerConnection, stream: InboundStream, result: Any, call: CallContext
    ) -> None:
        # The caller's timeout bounds a call up to the start of a streamed reply (Client.call),
        # not the whole transfer: from here on the deadline no longer applies.
        call.deadline = None
        conn.send_headers(stream.id, wire.response_headers(wire.STATUS_OK, wire.CONTENT_TYPE_STREAM))
        if isinstance(result, StreamWriter):
            await result.send_on(conn, stream.id)
            aborted = result.aborted
            conn.end_stream(stream.id, wire.ok_trailers() if aborted is None
                            else wire.error_trailers(aborted))
            return
        try:
            async for chunk in iterate_body(result, self._executor):
                if call.cancelled.is_set():
                    raise asyncio.CancelledError
                if chunk:
                    await conn.send_data(stream.id, chunk, end_stream=False)
        except (asyncio.CancelledError, StreamBrokenError, ConnectionError):
            raise
        except Exception as exc:
            conn.end_stream(stream.id, wire.error_trailers(exc))
            return
        finally:
            close = getattr(result, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        conn.end_stream(stream.id, wire.ok_trailers())

    async def _reply_error(
        self, conn: ServerConnection, stream: InboundStream, status: int, exc: BaseException
    ) -> None:
        headers, body = wire.error_response(status, exc)
        if stream.id not in conn.streams and stream.error is not None:
            return
        try:
            conn.send_headers(stream.id, headers)
            await conn.send_data(stream.id, body, end_stream=True)
        except (StreamBrokenError, ConnectionError, ProtocolError):
            conn.reset_stream(stream.id, ErrorCodes.CANCEL)


class _BadArgumentError(BadRequestError):
    """The argument's bytes arrived but could not be unpickled here."""


class _ReplyEncodingError(TypeError):
    """The method's reply could not be pickled (the caller sees a ``TypeError``)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (TypeError, (str(self),))


def call_cancelled(call: CallContext | None) -> None:
    if call is not None:
        call.cancelled.set()


class ServerConnection(H2Connection):
    """One client's connection: a task per call, cancelled when the caller resets or leaves."""

    def __init__(self, server: Server) -> None:
        super().__init__(client_side=False, max_concurrent_streams=server.max_concurrent_streams)
        self.server = server
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.calls: dict[int, CallContext] = {}
        self._peer_certificate: dict[str, Any] | None = None
        self._started_calls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.server._ssl is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                transport.close()
                return
            self._peer_certificate = transport.get_extra_info("peercert")
        self.server._connections.add(self)
        super().connection_made(transport)

    def data_received(self, data: bytes | memoryview) -> None:
        self._started_calls = False
        super().data_received(data)
        if self._started_calls:
            # The calls just started take their first step in the next loop iteration; a flush
            # scheduled now runs right after them in that same iteration, so replies made
            # without waiting go out one iteration (an epoll_wait and a loop pass) sooner.
            self.schedule_flush()

    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request_received(event)
        else:
            super().handle_event(event)

    def _request_received(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        stream = InboundStream(self, stream_id)
        stream.headers = list(event.headers)
        self.streams[stream_id] = stream
        call: CallContext | None = None
        error: BaseException | None = None
        try:
            service, method, streamed, timeout = wire.parse_request(stream.headers)
        except BadRequestError as exc:
            error = exc
        else:
            deadline = self.loop.time() + timeout if timeout is not None else None
            call = CallContext(
                service, method, deadline, self.peer, self._peer_certificate, streamed
            )
            self.calls[stream_id] = call
        task = self.loop.create_task(self.server.handle(self, stream, call, error))
        self._started_calls = True
        self.tasks[stream_id] = task
        task.add_done_callback(functools.partial(self._call_done, stream_id))
        if call is not None and call.deadline is not None:
            # Cancelled with the call: a far deadline must not keep a finished call (and its
            # connection) alive.
            timer = self.loop.call_at(call.deadline, self._expire, stream_id, task)
            task.add_done_callback(lambda _: timer.cancel())

    def _expire(self, stream_id: int, task: asyncio.Task[None]) -> None:
        call = self.calls.get(stream_id)
        if call is not None and call.deadline is None:
            return  # a streamed reply has started (see Server._reply_stream)
        if not task.done():
            task.cancel()

    def _call_done(self, stream_id: int, task: asyncio.Task[None]) -> None:
        self.tasks.pop(stream_id, None)
        self.calls.pop(stream_id, None)
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.ended:
            # Replied before reading the whole request: stop the rest from coming.
            self.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def stream_reset(self, stream: InboundStream, error_code: int | None) -> None:
        super().stream_reset(stream, error_code)
        call = self.calls.get(stream.id)
        call_cancelled(call)
        task = self.tasks.get(stream.id)
        if task is not None:
            # A method reading its streamed argument first sees StreamBrokenError (the stream
            # was just failed); the task is cancelled a step later if it is still running.
            self.loop.call_soon(task.cancel)

    def on_closed(self) -> None:
        self.server._connections.discard(self)
        for call in self.calls.values():
            call.cancelled.set()
        for task in list(self.tasks.values()):
            self.loop.call_soon(task.cancel)  # after readers see their stream fail, as above
