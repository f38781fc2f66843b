"""Keep large buffers' memory in the process between tasks (glibc only).

Moving a large argument or result allocates several buffers of its size. glibc serves each
from fresh ``mmap`` pages and returns them on ``free``, so every buffer pays a page fault
per 4 KiB page again; on virtual machines that is ~7 ms for 8 MiB, more than copying it.
Raising glibc's mmap threshold (to :data:`MMAP_THRESHOLD`) and trim threshold (to
:data:`TRIM_THRESHOLD`) lets freed buffers be reused: an 8 MiB copy drops to ~0.5 ms. The cost
is that up to ``TRIM_THRESHOLD`` of freed memory stays in the process (RSS) for reuse.

Machines and worker processes always do this; a driver does it when its first pool starts.
``BIGPOOL_MALLOC_TUNING=0`` in the environment turns it off everywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 * 1024 * 1024
ENV_SWITCH = "BIGPOOL_MALLOC_TUNING"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc() -> bool:
    """Apply the thresholds once per process; whether they are in force (False off glibc)."""
    global _done
    if _done:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        libc = _load_libc()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def _load_libc() -> ctypes.CDLL:
    """glibc by its soname first: ``find_library`` runs ``ldconfig -p`` in a subprocess, a fork
    on the start-up path of every machine and worker process."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"))
