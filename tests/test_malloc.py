"""bigpool keeps large freed buffers for reuse (glibc), and the switch turns that off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Fill and free an 8 MiB buffer 20 times; count the page faults it took (after a warm-up).
PROBE = """
import resource
from bigpool._malloc import tune_malloc
tuned = tune_malloc()
assert tune_malloc() == tuned
source = bytes(8 << 20)
def cycle():
    buffer = bytearray(len(source))
    buffer[:] = source
    del buffer
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES_PER_BUFFER = (8 << 20) // 4096


def _run(switch: str) -> tuple[str, int]:
    env = {**os.environ, "BIGPOOL_MALLOC_TUNING": switch}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc only")
def test_freed_large_buffers_are_reused_without_page_faults() -> None:
    tuned, faults = _run("1")
    assert tuned == "True"
    assert faults < PAGES_PER_BUFFER, faults  # 20 buffers of 2,048 pages, nearly none new


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc only")
def test_the_switch_leaves_malloc_alone() -> None:
    tuned, faults = _run("0")
    assert tuned == "False"
    assert faults > 10 * PAGES_PER_BUFFER, faults  # glibc's default: fresh pages every time


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc only")
def test_glibc_is_found_without_running_ldconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    """find_library forks ``ldconfig -p``: every machine and worker would pay for it."""
    import ctypes.util

    from bigpool import _malloc

    def no_ldconfig(name: str) -> str:
        raise AssertionError(f"find_library({name!r}) was called")

    monkeypatch.setattr(ctypes.util, "find_library", no_ldconfig)
    assert _malloc._load_libc().mallopt is not None


def test_libc_falls_back_to_find_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no library has glibc's soname, the C library is looked up by name."""
    import ctypes
    import ctypes.util

    from bigpool import _malloc

    opened: list[str | None] = []

    class FakeCDLL:
        def __init__(self, name: str | None) -> None:
            opened.append(name)
            if name == "libc.so.6":
                raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", FakeCDLL)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.test")
    assert isinstance(_malloc._load_libc(), FakeCDLL)
    assert opened == ["libc.so.6", "libc.so.test"]
