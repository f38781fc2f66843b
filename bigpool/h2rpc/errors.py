"""The errors a bigpool RPC can end in, and how a remote exception crosses the wire.

The tree::

    BigpoolError
    ├── NetworkError            the transport failed (temporary: retrying may help)
    │   └── ConnectionLostError     an established connection went away mid-call
    ├── CallTimeoutError        the caller's deadline passed (also a TimeoutError)
    ├── RemoteError             the remote method raised and its exception could not be
    │                           rebuilt here (type name, message and traceback kept)
    ├── MethodNotFoundError     no such service or method on the peer (also a LookupError)
    ├── BadRequestError         the peer could not make sense of the request
    ├── StreamBrokenError       a streamed body ended early or failed in the middle
    └── ProtocolError           the peer broke the RPC protocol

A method's own exception, when its type can be rebuilt at the caller, is raised as that type
(not as a ``BigpoolError``) with a :class:`RemoteTraceback` in ``__cause__``, as
``multiprocessing`` does. Network errors are never confused with remote exceptions: only
:class:`NetworkError` has ``temporary = True``.
"""

from __future__ import annotations

import multiprocessing.pool
import pickle
import traceback
from typing import TYPE_CHECKING, Any

import dill

__all__ = [
    "BadRequestError",
    "BigpoolError",
    "CallTimeoutError",
    "ConnectionLostError",
    "MethodNotFoundError",
    "NetworkError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "StreamBrokenError",
    "decode_error",
    "encode_error",
]

# A traceback longer than this is cut (keeping its end, where the raise is) before it travels.
MAX_TRACEBACK_CHARS = 64 * 1024


class BigpoolError(Exception):
    """Base of every error bigpool itself raises."""

    temporary: bool = False


class NetworkError(BigpoolError):
    """The transport failed: the peer could not be reached, TLS failed, or the link broke.

    Marked ``temporary``: the call may succeed if made again (``retry_call`` does so).
    """

    temporary = True

    def __init__(self, message: str, *, addr: str | None = None) -> None:
        self.addr = addr
        super().__init__(f"{addr}: {message}" if addr else message)


class ConnectionLostError(NetworkError):
    """The connection carrying the call closed before its reply arrived."""


class CallTimeoutError(BigpoolError, TimeoutError):
    """The call did not finish within its timeout; the remote call was cancelled."""

    def __init__(self, method: str, timeout: float) -> None:
        self.method = method
        self.timeout = timeout
        super().__init__(f"call {method} timed out after {timeout:g}s")


# Not in typeshed; subclassing it keeps `isinstance(cause, multiprocessing.pool.RemoteTraceback)`.
if TYPE_CHECKING:
    _StdlibRemoteTraceback = Exception
else:
    _StdlibRemoteTraceback = multiprocessing.pool.RemoteTraceback


class RemoteTraceback(_StdlibRemoteTraceback):
    """The traceback of an exception raised on another machine, kept as text.

    Set as ``__cause__`` of the rebuilt exception, so a printed traceback shows both halves.
    It is a ``multiprocessing.pool.RemoteTraceback`` so existing checks keep working.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteTraceback, (self.tb,))


class RemoteError(BigpoolError):
    """A remote exception whose type could not be rebuilt at the caller."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}" if message else type_name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.message, self.remote_traceback))


class MethodNotFoundError(BigpoolError, LookupError):
    """The peer has no service or method of the name asked for."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MethodNotFoundError, (str(self),))


class BadRequestError(BigpoolError, ValueError):
    """The peer rejected the request as malformed (path, headers or body)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),))


class StreamBrokenError(BigpoolError):
    """A streamed argument or reply failed before its end; the data read so far is partial."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),))


class ProtocolError(BigpoolError):
    """The peer sent something the bigpool RPC protocol does not allow."""


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def format_remote_traceback(exc: BaseException) -> str:
    """The traceback text of ``exc`` as it travels: bounded, its end kept."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "... (traceback cut)\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


def encode_error(exc: BaseException) -> bytes:
    """Serialise an exception raised by a method into the error envelope.

    The envelope always carries the type name, message and traceback as plain strings, and
    the exception itself as a dill pickle when it can be pickled; so the caller can raise the
    same type, or at least a :class:`RemoteError` saying what happened.
    """
    tb = format_remote_traceback(exc)
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    saved_tb = exc.__traceback__
    saved_cause, saved_context = exc.__cause__, exc.__context__
    try:
        # The traceback travels as text; chained exceptions may not pickle and are part of it.
        exc.__traceback__ = None
        exc.__cause__ = exc.__context__ = None
        pickled: bytes | None = dill.dumps(exc)
        dill.loads(pickled)  # an exception that pickles but cannot be rebuilt is sent as text
    except Exception:
        pickled = None
    finally:
        exc.__traceback__ = saved_tb
        exc.__cause__, exc.__context__ = saved_cause, saved_context
    envelope = {"type": _type_name(exc), "message": message, "traceback": tb, "pickle": pickled}
    return pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL)


def decode_error(data: bytes) -> BaseException:
    """Rebuild the exception an error envelope describes, with its remote traceback attached.

    Returns (does not raise) the exception; a malformed envelope gives a :class:`ProtocolError`.
    """
    try:
        envelope = pickle.loads(data)
        type_name = str(envelope["type"])
        message = str(envelope["message"])
        tb = str(envelope["traceback"])
        pickled = envelope["pickle"]
    except Exception as exc:
        return ProtocolError(f"malformed error envelope from peer: {exc!r}")
    rebuilt: BaseException | None = None
    if pickled is not None:
        try:
            candidate = dill.loads(pickled)
        except Exception:
            candidate = None
        if isinstance(candidate, BaseException):
            rebuilt = candidate
    if rebuilt is None:
        rebuilt = RemoteError(type_name, message, tb)
    rebuilt.__cause__ = RemoteTraceback(tb)
    return rebuilt
