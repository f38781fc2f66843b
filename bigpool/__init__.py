"""bigpool: spread Python work over many machines.

A driver forms an ad-hoc cluster of machines, sends them code, and calls stateful services on
them; :class:`BigPool` puts a ``multiprocessing.Pool`` front door on top. This module is the
public API; everything else is an implementation detail unless documented.

Names load on first use (as ``concurrent.futures`` does): ``import bigpool`` is cheap, and a
machine's worker processes start without loading the driver's machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .expvar import expvar_add, expvar_set
    from .h2rpc.errors import (
        BigpoolError,
        CallTimeoutError,
        MethodNotFoundError,
        NetworkError,
        RemoteError,
        RemoteTraceback,
        StreamBrokenError,
    )
    from .machine import (
        B,
        Machine,
        MachineStoppedError,
        ServiceStartError,
        State,
        add_arguments,
        start,
    )
    from .pool import BigPool, BigPoolExecutor, BrokenExecutor, PoolTerminatedError, TaskLostError
    from .systems import KeepaliveConfig, System, register_system

__version__ = "0.1.0"

_EXPORTS = {
    "BigpoolError": "h2rpc.errors",
    "CallTimeoutError": "h2rpc.errors",
    "MethodNotFoundError": "h2rpc.errors",
    "NetworkError": "h2rpc.errors",
    "RemoteError": "h2rpc.errors",
    "RemoteTraceback": "h2rpc.errors",
    "StreamBrokenError": "h2rpc.errors",
    "B": "machine",
    "Machine": "machine",
    "MachineStoppedError": "machine",
    "ServiceStartError": "machine",
    "State": "machine",
    "add_arguments": "machine",
    "start": "machine",
    "BigPool": "pool",
    "BigPoolExecutor": "pool",
    "BrokenExecutor": "pool",
    "PoolTerminatedError": "pool",
    "TaskLostError": "pool",
    "KeepaliveConfig": "systems",
    "System": "systems",
    "register_system": "systems",
    "expvar_add": "expvar",
    "expvar_set": "expvar",
}

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
    "expvar_add",
    "expvar_set",
    "register_system",
    "start",
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
