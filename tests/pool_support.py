"""Shared machinery for the pool and executor conformance suites.

``BACKENDS`` are what the suites run against: ``"stdlib"`` (the reference:
``multiprocessing.Pool`` / ``concurrent.futures.ProcessPoolExecutor``), and bigpool's
``"test"`` (in-process machines) and ``"local"`` (one process per machine) systems. The
bigpool backends skip while ``bigpool.BigPool`` / ``bigpool.BigPoolExecutor`` do not exist.

The two bigpool backends take the two ways records travel: ``"local"`` pools use the
driver's host's shortcuts (a Unix socket per machine, shared memory for large payloads:
``bigpool.pool_socket``, ``bigpool.pool_shm``), ``"test"`` pools are made with
``shared_memory=False`` and send everything over HTTP/2 and TLS, as machines on other hosts do.

The stdlib reference uses the ``forkserver`` start method: the driver has threads (bigpool's
loop threads, pytest-timeout), which ``fork`` does not mix well with, and
``ProcessPoolExecutor(max_tasks_per_child=...)`` refuses ``fork``. The behaviour under test
does not depend on the start method.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import bigpool

BACKENDS = ["stdlib", "test", "local"]

STDLIB_CTX = multiprocessing.get_context("forkserver")


def require(backend: str, name: str) -> None:
    """Skip a bigpool backend while ``bigpool.<name>`` is not implemented."""
    if backend != "stdlib" and getattr(bigpool, name, None) is None:
        pytest.skip(f"{name} not implemented yet")


def bigpool_only(backend: str, why: str) -> None:
    if backend == "stdlib":
        pytest.skip(f"bigpool only: {why}")


def needs_processes(backend: str) -> None:
    """Skip on the test system: its machines run inside this process (one pid, no exits)."""
    if backend == "test":
        pytest.skip("test-system machines run in the driver process: no pids or exits of their own")


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def new_pool(
    backend: str,
    processes: int | None = 2,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    maxtasksperchild: int | None = None,
) -> Any:
    if backend == "stdlib":
        return STDLIB_CTX.Pool(processes, initializer, initargs, maxtasksperchild)
    return bigpool.BigPool(  # type: ignore[attr-defined]
        processes, initializer, initargs, maxtasksperchild, system=backend,
        shared_memory=backend != "test",
    )


def new_executor(
    backend: str,
    max_workers: int | None = 2,
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_child: int | None = None,
) -> Any:
    kw: dict[str, Any] = {"initializer": initializer, "initargs": initargs}
    if max_tasks_per_child is not None:
        kw["max_tasks_per_child"] = max_tasks_per_child
    if backend == "stdlib":
        return ProcessPoolExecutor(max_workers, mp_context=STDLIB_CTX, **kw)
    return bigpool.BigPoolExecutor(  # type: ignore[attr-defined]
        max_workers, system=backend, shared_memory=backend != "test", **kw)


class Gate:
    """A file-system gate: tasks given ``path`` block until :meth:`open`; tasks given
    ``markers`` (a directory) too, after dropping a marker file there (see :meth:`started`)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.path = str(directory / "open")
        self.markers = str(directory / "markers")
        os.mkdir(self.markers)

    def open(self) -> None:
        Path(self.path).touch()

    def started(self) -> int:
        return len(os.listdir(self.markers))


class Gates:
    """Makes gates, and opens every one of them at teardown (so no worker stays blocked)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._gates: list[Gate] = []

    def new(self) -> Gate:
        gate = Gate(self._directory / f"gate{len(self._gates)}")
        self._gates.append(gate)
        return gate

    def open_all(self) -> None:
        for gate in self._gates:
            gate.open()
