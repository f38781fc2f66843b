"""``multiprocessing`` with its ``Pool`` running on bigpool machines.

Everything else (``TimeoutError``, ``cpu_count``, ``Queue``, ...) is the standard library's
own, so ``except multiprocessing.TimeoutError`` and friends keep working.
"""

from __future__ import annotations

import multiprocessing as _stdlib
import multiprocessing.pool as _stdlib_pool
from multiprocessing import *  # noqa: F403  (the whole stdlib surface, on purpose)

from ..pool import ApplyResult, AsyncResult, BigPool

MaybeEncodingError = getattr(_stdlib_pool, "MaybeEncodingError")  # noqa: B009
RemoteTraceback = getattr(_stdlib_pool, "RemoteTraceback")  # noqa: B009
Pool = BigPool  # type: ignore[assignment]

__all__ = [
    *(name for name in getattr(_stdlib, "__all__", ()) if name != "Pool"),
    "ApplyResult",
    "AsyncResult",
    "MaybeEncodingError",
    "Pool",
    "RemoteTraceback",
]
