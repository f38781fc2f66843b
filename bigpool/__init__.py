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

_LAZY = {
    "BigPool": "bigpool.pool",
    "BigPoolExecutor": "bigpool.pool",
    "BrokenExecutor": "bigpool.pool",
    "PoolTerminatedError": "bigpool.pool",
    "TaskLostError": "bigpool.pool",
}


def __getattr__(name: str) -> object:
    # The pool (and its worker service) load on first use, keeping `import bigpool` light.
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'bigpool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value

__all__ = [
    "B",
    "BigPool",
    "BigPoolExecutor",
    "BigpoolError",
    "BrokenExecutor",
    "CallTimeoutError",
    "KeepaliveConfig",
    "Machine",
    "MachineStoppedError",
    "MethodNotFoundError",
    "NetworkError",
    "PoolTerminatedError",
    "RemoteError",
    "RemoteTraceback",
    "ServiceStartError",
    "State",
    "StreamBrokenError",
    "System",
    "TaskLostError",
    "__version__",
    "add_arguments",
    "register_system",
    "start",
]
