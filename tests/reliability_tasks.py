"""Tasks for the reliability tests, in a small module so machines import them cheaply."""

from __future__ import annotations

import os
import time


def host_of_task() -> str:
    """The network namespace the task ran in: which host did the work."""
    return os.readlink("/proc/self/ns/net")


def square_slowly(x: int, seconds: float = 0.0005) -> int:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return x * x


def square_where(x: int) -> tuple[int, str]:
    time.sleep(0.02)
    return x * x, host_of_task()


def allocate(nbytes: int) -> int:
    """Touch ``nbytes`` of memory (every page written), like Bigmachine's ``bigoom``."""
    block = b"x" * nbytes
    return len(block)


class Probe:
    """A service for direct calls beside the pool's."""

    def echo(self, x: object) -> object:
        return x

    def pid(self, _: object = None) -> int:
        return os.getpid()

    def census(self, _: object = None) -> dict[str, int]:
        """What the machine's process holds: objects, server connections, open files."""
        import gc

        gc.collect()
        objects = gc.get_objects()
        return {
            "objects": len(objects),
            "server_connections": sum(type(o).__name__ == "ServerConnection" for o in objects),
            "fds": len(os.listdir("/proc/self/fd")),
        }
