"""bigpool's wire: RPC over HTTP/2 (the ``h2`` library on asyncio) with mutual TLS.

This package knows nothing of machines or pools. It offers an :class:`Authority` that issues
:class:`Credentials`, a :class:`Server` that serves registered objects' methods, a
:class:`Client` that calls them, readers for streamed bodies, and the error tree in
:mod:`bigpool.h2rpc.errors`. See ``docs/rpc.md`` for the wire format and security model.
"""

from .authority import Authority, Credentials
from .client import Client, parse_address
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
from .streams import StreamReader, SyncStreamReader

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
    "SyncStreamReader",
    "current_call",
    "parse_address",
]
