"""Counters and gauges a process publishes, Go's ``expvar`` for bigpool. Standard library only.

Every process keeps its own table: the driver, each machine, each pool worker process. The
driver's debug endpoint shows them all at ``/debug/vars``: the driver's own, each machine's
(through ``Supervisor.expvars``), and, for a pool, what its worker processes published,
summed per machine (workers send their table to their machine after a chunk in which it
changed). Use them through ``bigpool.expvar_add`` and ``bigpool.expvar_set``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["expvar_add", "expvar_set", "expvars_snapshot", "fold", "version"]

_lock = threading.Lock()
_vars: dict[str, Any] = {}
_version = 0


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"an expvar name must be a non-empty string, not {name!r}")
    return name


def expvar_add(name: str, delta: float = 1) -> None:
    """Add ``delta`` to the counter ``name`` of this process (thread-safe; starts at 0).

    Raises ``TypeError`` if ``delta`` is not a number or ``name`` holds a value that is not.
    """
    _check_name(name)
    if not isinstance(delta, int | float) or isinstance(delta, bool):
        raise TypeError(f"expvar {name!r}: delta must be a number, not {delta!r}")
    global _version
    with _lock:
        current = _vars.get(name, 0)
        if not isinstance(current, int | float) or isinstance(current, bool):
            raise TypeError(f"expvar {name!r} holds {current!r}, which cannot be added to")
        _vars[name] = current + delta
        _version += 1


def expvar_set(name: str, value: Any) -> None:
    """Set the gauge ``name`` of this process to ``value`` (a JSON-like value)."""
    _check_name(name)
    global _version
    with _lock:
        _vars[name] = value
        _version += 1


def expvars_snapshot() -> dict[str, Any]:
    """A copy of this process's counters and gauges."""
    with _lock:
        return dict(_vars)


def version() -> int:
    """A number that changes whenever the table does (cheap: no lock, no copy)."""
    return _version


def fold(total: dict[str, Any], values: Mapping[str, Any]) -> None:
    """Merge ``values`` into ``total``: numbers add up, anything else takes the latest value."""
    for key, value in values.items():
        current = total.get(key)
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and isinstance(current, int | float) and not isinstance(current, bool)):
            total[key] = current + value
        else:
            total[key] = value
