"""bigpool: spread Python work over many machines.

A driver forms an ad-hoc cluster of machines, sends them code, and calls stateful services on
them; :class:`BigPool` puts a ``multiprocessing.Pool`` front door on top. This module is the
public API; everything else is an implementation detail unless documented.
"""

from .h2rpc.errors import (
    BigpoolError,
    CallTimeoutError,
    MethodNotFoundError,
    NetworkError,
    RemoteError,
    RemoteTraceback,
    StreamBrokenError,
)
from .machine import B, Machine, MachineStoppedError, ServiceStartError, State, add_arguments, start
from .systems import KeepaliveConfig, System, register_system

__version__ = "0.1.0"

__all__ = [
    "B",
    "BigpoolError",
    "CallTimeoutError",
    "KeepaliveConfig",
    "Machine",
    "MachineStoppedError",
    "MethodNotFoundError",
    "NetworkError",
    "RemoteError",
    "RemoteTraceback",
    "ServiceStartError",
    "State",
    "StreamBrokenError",
    "System",
    "__version__",
    "add_arguments",
    "register_system",
    "start",
]
