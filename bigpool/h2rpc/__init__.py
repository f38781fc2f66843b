"""bigpool's wire: RPC over HTTP/2 (the ``h2`` library on asyncio) with mutual TLS.

This package knows nothing of machines or pools. It offers an :class:`Authority` that issues
:class:`Credentials`, a :class:`Server` that serves registered objects' methods, a
:class:`Client` that calls them, readers for streamed bodies, and the error tree in
:mod:`bigpool.h2rpc.errors`. See ``docs/rpc.md`` for the wire format and security model.

Names load on first use (as ``concurrent.futures`` does), so a process that needs only the
errors, a worker for instance, does not pay for TLS, HTTP/2 and ``cryptography``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .authority import Authority
    from .client import Client, parse_address
    from .credentials import Credentials
    from .errors import (
        BadRequestError,
        BigpoolError,
        CallTimeoutError,
        ConnectionLostError,
        MethodNotFoundError,
        NetworkError,
        ProtocolError,
        RemoteError,
        RemoteTraceback,
        StreamBrokenError,
    )
    from .loop import LoopThread
    from .server import CallContext, Server, current_call
    from .streams import StreamReader, StreamWriter, SyncStreamReader

_EXPORTS = {
    "Authority": "authority",
    "Credentials": "credentials",
    "Client": "client",
    "parse_address": "client",
    "BadRequestError": "errors",
    "BigpoolError": "errors",
    "CallTimeoutError": "errors",
    "ConnectionLostError": "errors",
    "MethodNotFoundError": "errors",
    "NetworkError": "errors",
    "ProtocolError": "errors",
    "RemoteError": "errors",
    "RemoteTraceback": "errors",
    "StreamBrokenError": "errors",
    "LoopThread": "loop",
    "CallContext": "server",
    "Server": "server",
    "current_call": "server",
    "StreamReader": "streams",
    "StreamWriter": "streams",
    "SyncStreamReader": "streams",
}

__all__ = [
    "Authority",
    "BadRequestError",
    "BigpoolError",
    "CallContext",
    "CallTimeoutError",
    "Client",
    "ConnectionLostError",
    "Credentials",
    "LoopThread",
    "MethodNotFoundError",
    "NetworkError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "Server",
    "StreamBrokenError",
    "StreamReader",
    "StreamWriter",
    "SyncStreamReader",
    "current_call",
    "parse_address",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
