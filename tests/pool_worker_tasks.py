"""Task functions for tests/test_pool_worker.py, in a module of their own.

They are pickled by reference and imported by the worker processes, so this module imports
the standard library only (a worker that imports it starts fast).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

_initialized: str | None = None


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def getpid(_: object) -> int:
    return os.getpid()


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"three is not allowed ({x})")
    return x


def make_generator(x: int) -> Any:
    return (i for i in range(x))


def exit_three(_: object) -> None:
    print("about to exit with 3", file=sys.stderr, flush=True)
    os._exit(3)


def pid_then_sleep(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return path


def rendezvous(mine: str, other: str) -> bool:
    """Announce ``mine``, then wait (with a deadline) for the other task's ``other``."""
    Path(mine).touch()
    deadline = time.monotonic() + 10
    while not os.path.exists(other):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def say(text: str) -> str:
    print(text)
    return text


def init_worker(counter: str, value: str) -> None:
    global _initialized
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    _initialized = value


def read_initialized(_: object) -> str | None:
    return _initialized


def failing_initializer() -> None:
    raise KeyError("initializer-boom")


def noop(_: object) -> None:
    return None




def init_unless_file(flag: str) -> None:
    """An initializer that fails while ``flag`` exists."""
    if os.path.exists(flag):
        raise RuntimeError(f"initializer refused: {flag} exists")


def length(x: Any) -> int:
    return len(x)


def announce_then_sum(path: str, n: int) -> int:
    """Announce ``path``, then add up ``range(n)`` in one C call: the GIL is held throughout."""
    Path(path).touch()
    return sum(range(n))
