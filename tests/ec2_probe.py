"""A service for the EC2 boot test: where and how the machine runs (kept small, since machines
import it)."""

from __future__ import annotations

import os
import sys
from typing import Any


class Probe:
    def where(self) -> dict[str, Any]:
        import bigpool

        return {
            "prefix": sys.prefix,
            "executable": sys.executable,
            "digest": os.environ.get("BIGPOOL_BUNDLE_DIGEST"),
            "bigpool": bigpool.__file__,
            "netns": os.stat("/proc/self/ns/net").st_ino,
        }

    def add(self, pair: tuple[int, int]) -> int:
        return pair[0] + pair[1]


def square(x: int) -> int:
    return x * x


def netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino
