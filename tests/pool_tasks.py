"""Task functions for the pool and executor conformance suites.

They live in an importable module (not the test files) so the stdlib reference can pickle them
by reference, and bigpool's local machines (which inherit the driver's ``sys.path``) can
import them. Nothing here may depend on pytest.

Tests never sleep to wait for a condition: a task that must stay busy waits on a *gate*, a
file the test creates when it wants the task to finish (``wait_for``); a task that must be
seen to have started first drops a marker file (``mark_and_wait``). Every wait has a limit,
so a test that forgets to open a gate cannot hang a worker for ever.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

GATE_LIMIT = 30.0

# Set by the initializers below, read back by tasks.
INIT_TAG: Any = None


class TaskError(Exception):
    """An exception class of our own, raised by tasks (picklable: it keeps its args)."""


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def add3(a: int, b: int, c: int) -> int:
    return a + b + c


def kw_task(a: Any, b: Any = "b-default", *, c: Any = "c-default") -> tuple[Any, Any, Any]:
    return (a, b, c)


def echo_args(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (args, kwargs)


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"task failed on {x}")
    return x


def raise_task_error(message: str) -> None:
    raise TaskError(message)


def sleep_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def pid(_: Any = None) -> int:
    return os.getpid()


def return_generator(_: Any = None) -> Any:
    """A result that neither pickle nor dill can serialise."""
    return (i for i in range(3))


def exit_process(code: int) -> None:
    os._exit(code)


def errors_at(n: int, bad: int) -> Any:
    """A generator (the *input* of a map) that raises KeyError when it reaches ``bad``."""
    for i in range(n):
        if i == bad:
            raise KeyError(f"input iterable failed at {i}")
        yield i


# --- gates -------------------------------------------------------------------------------


def wait_for(gate: str, value: Any = None, limit: float = GATE_LIMIT) -> Any:
    """Return ``value`` once the file ``gate`` exists; TimeoutError after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} was never opened")
        time.sleep(0.005)
    return value


def mark_and_wait(markers: str, gate: str, value: Any = None, limit: float = GATE_LIMIT) -> Any:
    """Drop a marker file in directory ``markers`` (the task has started), then ``wait_for``."""
    name = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex}"
    with open(os.path.join(markers, name), "w"):
        pass
    return wait_for(gate, value, limit)


# --- initializers ------------------------------------------------------------------------


def record_init(directory: str, tag: Any) -> None:
    """Initializer: remember ``tag`` and append this process's pid to ``directory``/inits."""
    global INIT_TAG
    INIT_TAG = tag
    with open(os.path.join(directory, "inits"), "a") as f:
        f.write(f"{os.getpid()}\n")


def pid_and_tag(_: Any = None) -> tuple[int, Any]:
    return (os.getpid(), INIT_TAG)


def failing_init() -> None:
    raise RuntimeError("initializer failed on purpose")
