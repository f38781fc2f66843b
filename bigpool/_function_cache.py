"""Pickle a task's function once, not once per task.

A function importable by reference (``module.name``) pickles to the same bytes every time, so
its pickle is kept for as long as the function lives. A function copied by value (from
``__main__``, a lambda, a closure) carries the globals and closure cells it uses, which the
program may rebind; re-pickling it with dill on every ``apply`` costs ~100 µs, most of an
apply's time in the driver. Its pickle is reused while the objects it was made from are the
same objects (compared with ``is``): the code, defaults, closure cells' contents, the
function's ``__dict__`` entries, and every global it (or a by-value function it calls) names.

So rebinding a global (``LIMIT = 10`` after ``LIMIT = 5``), redefining a helper or changing a
default all reach the machines, while mutating an object in place (``CONFIG["k"] = v``) does
not, once the function has been sent. That is what ``multiprocessing`` gives too: its workers
see the parent's globals as they were when the workers started (fork) or as ``__main__``
defines them (spawn), never later mutations.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

from .h2rpc.wire import pickle_value

# Functions reached through globals whose own globals are checked too, at most.
MAX_FUNCTIONS_CHECKED = 64

_MISSING = object()
_SELF = object()

# code object -> every name its bytecode (and nested code) may look up as a global
_names_by_code: weakref.WeakKeyDictionary[types.CodeType, tuple[str, ...]] = (
    weakref.WeakKeyDictionary()
)


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names = _names_by_code.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(_global_names(const))
        names = tuple(sorted(found))
        _names_by_code[code] = names
    return names


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _MISSING


def source_objects(func: types.FunctionType) -> list[Any]:
    """The objects a by-value pickle of ``func`` is made from, in a fixed order.

    Two calls give lists equal element by element (``is``) exactly when nothing the pickle
    depends on was rebound. ``func`` itself appears as a marker, so the list holds no
    reference that would keep ``func`` alive.
    """
    state: list[Any] = []
    pending = [func]
    seen: set[int] = set()
    while pending and len(seen) < MAX_FUNCTIONS_CHECKED:
        f = pending.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        code = f.__code__
        state += (code, f.__defaults__, f.__kwdefaults__, len(f.__dict__))
        state += f.__dict__.values()
        if f.__closure__:
            state += map(_cell_contents, f.__closure__)
        g = f.__globals__
        for name in _global_names(code):
            value = g.get(name, _MISSING)
            state.append(value)
            if (isinstance(value, types.FunctionType) and value is not func
                    and value.__module__ == func.__module__):
                pending.append(value)
    if pending:  # too many to check: never reuse this pickle
        state.append(object())
    return [_SELF if item is func else item for item in state]


class _Entry:
    __slots__ = ("data", "sources")

    def __init__(self, data: bytes, sources: list[Any] | None) -> None:
        self.data = data
        self.sources = sources


_entries: weakref.WeakKeyDictionary[Any, _Entry] = weakref.WeakKeyDictionary()


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def pickle_function(func: Callable[..., Any]) -> bytes:
    """The pickle of ``func`` for the wire, made again only when it may have changed.

    Raises what pickling raises when ``func`` cannot be pickled.
    """
    if not isinstance(func, types.FunctionType):
        # A partial, a bound method or a callable object: its state is not tracked (a
        # partial's arguments may be mutated), so it is pickled afresh every time.
        return pickle_value(func)[0]
    entry = _entries.get(func)
    if entry is not None and (entry.sources is None or _same(entry.sources, source_objects(func))):
        return entry.data
    before = source_objects(func)
    data, by_value = pickle_value(func)
    sources: list[Any] | None = before if by_value else None
    _entries[func] = _Entry(data, sources)
    return data
