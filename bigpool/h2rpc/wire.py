"""The bigpool RPC wire format, as pure functions: no sockets, no event loop.

A call is one HTTP/2 stream::

    client                                         server
    HEADERS  :method POST  :path /bigrpc/Svc.meth
             content-type  (value | stream)
             bigrpc-timeout  seconds (optional)
    DATA...  dill pickle of the argument, or the raw bytes of a streamed argument
    [TRAILERS bigrpc-status: ok]   (streamed argument only: marks a complete stream)
                                                   HEADERS :status, content-type
                                                   DATA... reply pickle | raw bytes | error envelope
                                                   [TRAILERS bigrpc-status ok|error, bigrpc-error]
                                                   (streamed reply only)

``:status`` is 200 for a reply, 500 for an exception raised by the method, 404 for an unknown
service or method, 400 for a malformed request; an error's body is the envelope of
:func:`bigpool.h2rpc.errors.encode_error`. A streamed body is complete only when it ends with a
trailer ``bigrpc-status: ok``; anything else (a reset, an error trailer, a stream that just
ends) is a failure the reader sees as :class:`StreamBrokenError`.
"""

from __future__ import annotations

import base64
import io
import pickle
import types
from collections.abc import AsyncIterable, Iterable, Iterator
from typing import Any

import dill

from .errors import BadRequestError, ProtocolError, StreamBrokenError, decode_error, encode_error

Headers = list[tuple[bytes, bytes]]

RPC_PREFIX = b"/bigrpc/"

CONTENT_TYPE_VALUE = b"application/x-bigrpc-dill"
CONTENT_TYPE_STREAM = b"application/octet-stream"
CONTENT_TYPE_ERROR = b"application/x-bigrpc-error"

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_NOT_FOUND = 404
STATUS_REMOTE_ERROR = 500

HEADER_TIMEOUT = b"bigrpc-timeout"
TRAILER_STATUS = b"bigrpc-status"
TRAILER_ERROR = b"bigrpc-error"

# Longest method name a request may carry; a bound on what a peer can make us hold.
MAX_METHOD_NAME = 1024

class _NeedsDill(Exception):
    """Raised inside :class:`_WirePickler` on meeting something defined in ``__main__``."""


class _WirePickler(pickle.Pickler):
    """The C pickler, stopped at the first class or function from ``__main__``.

    Such a reference would not load on another machine. Asking here costs one call per
    class or function pickled, where searching the finished pickle for ``__main__`` costs a
    pass over every byte (milliseconds for a large argument).
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type | types.FunctionType):
            if obj.__module__ == "__main__":
                raise _NeedsDill
        elif type(obj).__module__ == "__main__":
            raise _NeedsDill  # an instance whose reduction might name it in __main__
        return NotImplemented


def pickle_value(value: Any, buffers: list[pickle.PickleBuffer] | None = None,
                 out_of_band_from: int = 64 * 1024) -> tuple[bytes, bool]:
    """(pickle, by_value) of a value for the wire.

    The C pickler is used when it can carry the value: dill's pure-Python pickler costs ~20x
    more and adds nothing there. A pickle that refers to ``__main__`` would not load on
    another machine, so such values (and lambdas, closures and the like, which the C pickler
    refuses) go through dill, which copies them by value with the globals they use;
    ``by_value`` says so.

    With a ``buffers`` list, the pickle's buffers of at least ``out_of_band_from`` bytes (the
    ``PickleBuffer`` objects a value reduces to under protocol 5) are appended to it instead of
    copied into the pickle: load it with ``buffers=`` those buffers, in order.
    """
    callback = None
    if buffers is not None:

        def callback(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < out_of_band_from:
                return True  # in band
            buffers.append(buffer)
            return False

    buffer = io.BytesIO()
    try:
        _WirePickler(buffer, protocol=5, buffer_callback=callback).dump(value)
    except Exception:
        pass
    else:
        return buffer.getvalue(), False
    del buffer
    if buffers is not None:
        buffers.clear()
    return bytes(dill.dumps(value, protocol=5, recurse=True, buffer_callback=callback)), True


def encode_value(value: Any) -> bytes:
    """Pickle a value for the wire (see :func:`pickle_value`)."""
    return pickle_value(value)[0]


def decode_value(data: bytes | bytearray | memoryview) -> Any:
    """Unpickle a value from the wire (dill's unpickler reads both encoders' output)."""
    return dill.loads(data)


def is_streamed(value: Any) -> bool:
    """Whether ``value`` travels as a stream of raw bytes rather than as a pickle.

    Binary file-like objects (anything with ``read`` that is not text) and iterators or async
    iterators of bytes are streamed; lists, bytes and other values are pickled whole.
    """
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return False
    if isinstance(value, io.TextIOBase):
        raise TypeError("a text file cannot be streamed; open it in binary mode ('rb')")
    if hasattr(value, "read") and callable(value.read):
        return True
    return isinstance(value, Iterator) or hasattr(value, "__anext__")


def parse_path(path: bytes) -> tuple[str, str]:
    """Split ``/bigrpc/Service.method`` into its service and method names.

    Raises :class:`BadRequestError` naming the path when it is not of that form.
    """
    if not path.startswith(RPC_PREFIX):
        raise BadRequestError(f"path {path[:200]!r} does not start with {RPC_PREFIX.decode()}")
    name = path[len(RPC_PREFIX) :]
    if len(name) > MAX_METHOD_NAME:
        raise BadRequestError(f"method name of {len(name)} bytes is too long")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequestError(f"method name {name[:200]!r} is not ASCII") from None
    service, dot, method = text.partition(".")
    if not dot or not service or not method or "." in method:
        raise BadRequestError(f"method name {text!r} is not of the form Service.method")
    return service, method


def method_path(service_method: str) -> bytes:
    """The request path for ``"Service.method"``, checked as the server will check it."""
    try:
        name = service_method.encode("ascii")
    except UnicodeEncodeError:
        # Not "replace": "S.café" must not quietly become a call of "S.caf?".
        raise BadRequestError(f"method name {service_method[:200]!r} is not ASCII") from None
    path = RPC_PREFIX + name
    parse_path(path)
    return path


def request_headers(
    authority: bytes, path: bytes, *, streamed: bool, timeout: float | None
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", authority),
        (b":path", path),
        (b"content-type", CONTENT_TYPE_STREAM if streamed else CONTENT_TYPE_VALUE),
    ]
    if timeout is not None:
        headers.append((HEADER_TIMEOUT, b"%.6f" % timeout))
    return headers


def parse_request(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str, bool, float | None]:
    """(service, method, streamed argument?, timeout) from request headers.

    Raises :class:`BadRequestError` naming what is wrong.
    """
    method = path = content_type = timeout_text = None
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":path":
            path = value
        elif name == b"content-type":
            content_type = value
        elif name == HEADER_TIMEOUT:
            timeout_text = value
    if method != b"POST":
        raise BadRequestError(f"method {method!r} is not POST")
    if path is None:
        raise BadRequestError("request has no :path")
    service, meth = parse_path(path)
    if content_type == CONTENT_TYPE_VALUE:
        streamed = False
    elif content_type == CONTENT_TYPE_STREAM:
        streamed = True
    else:
        raise BadRequestError(f"content-type {content_type!r} is not a bigrpc content type")
    timeout = None
    if timeout_text is not None:
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise BadRequestError(f"bigrpc-timeout {timeout_text[:50]!r} is not a number") from None
        if not timeout > 0 or timeout == float("inf"):
            raise BadRequestError(f"bigrpc-timeout {timeout_text[:50]!r} is not a positive number")
    return service, meth, streamed, timeout


def response_headers(status: int, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":status", b"%d" % status), (b"content-type", content_type)]


def parse_response(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, bytes | None]:
    """(status, content type) from response headers; :class:`ProtocolError` if malformed."""
    status = content_type = None
    for name, value in headers:
        if name == b":status":
            status = value
        elif name == b"content-type":
            content_type = value
    try:
        code = int(status or b"")
    except ValueError:
        raise ProtocolError(f"response has no valid :status ({status!r})") from None
    return code, content_type


def error_response(status: int, exc: BaseException) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body that carry ``exc`` to the caller."""
    return response_headers(status, CONTENT_TYPE_ERROR), encode_error(exc)


def response_error(status: int, content_type: bytes | None, body: bytes) -> BaseException:
    """The exception a non-200 response stands for."""
    if content_type == CONTENT_TYPE_ERROR:
        return decode_error(body)
    return ProtocolError(f"unexpected response: status {status}, content-type {content_type!r}")


# Trailers carry at most this much of an error envelope; well under h2's default header-list
# limit (64 KiB), so a failing stream can always say why.
MAX_TRAILER_ERROR = 32 * 1024


def ok_trailers() -> list[tuple[bytes, bytes]]:
    return [(TRAILER_STATUS, b"ok")]


def error_trailers(exc: BaseException) -> list[tuple[bytes, bytes]]:
    envelope = encode_error(exc)
    if len(envelope) * 4 // 3 > MAX_TRAILER_ERROR:
        envelope = encode_error(StreamBrokenError(f"{type(exc).__name__}: {str(exc)[:2000]}"))
    return [(TRAILER_STATUS, b"error"), (TRAILER_ERROR, base64.b64encode(envelope))]


def stream_trailer_error(trailers: Iterable[tuple[bytes, bytes]] | None) -> BaseException | None:
    """None if the trailers mark a complete stream, else the error that broke it."""
    if trailers is None:
        return StreamBrokenError("stream ended without its completion trailer")
    fields = dict(trailers)
    status = fields.get(TRAILER_STATUS)
    if status == b"ok":
        return None
    if status == b"error" and TRAILER_ERROR in fields:
        try:
            envelope = base64.b64decode(fields[TRAILER_ERROR], validate=True)
        except ValueError:
            return ProtocolError("stream error trailer is not base64")
        return decode_error(envelope)
    return ProtocolError(f"stream ended with unknown status trailer {status!r}")


def iter_slices(data: bytes | memoryview, size: int) -> Iterator[memoryview]:
    """Cut ``data`` into views of at most ``size`` bytes without copying."""
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start : start + size]


def is_async_iterable(value: Any) -> bool:
    return isinstance(value, AsyncIterable)
