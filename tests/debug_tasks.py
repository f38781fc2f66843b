"""Functions and services for the debug endpoint tests, importable on machines and workers."""

from __future__ import annotations

import os
import time
from typing import Any

import bigpool


def burn_until(gate: str, markers: str) -> int:
    """Spin on the CPU until the file ``gate`` exists; first drop a marker in ``markers``."""
    with open(os.path.join(markers, f"{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    spins = 0
    while not os.path.exists(gate):
        for _ in range(20000):
            spins += 1
    return spins


class Publisher:
    """Publishes this machine's pid as an expvar gauge, and counts its starts."""

    def init(self, b: Any) -> None:
        bigpool.expvar_set("publisher_pid", os.getpid())
        bigpool.expvar_add("publisher_inits")

    def burn_until(self, args: tuple[str, str]) -> int:
        return burn_until(*args)


def count_rows(n: int) -> int:
    """A pool task that publishes from its worker process: a counter and a gauge.

    It takes 50 ms, so the pool spreads the tasks over every machine (a chunk that may be long
    is never queued behind another) instead of letting the first machine run them all.
    """
    bigpool.expvar_add("rows_seen", n)
    bigpool.expvar_set("last_pid", os.getpid())
    time.sleep(0.05)
    return n
