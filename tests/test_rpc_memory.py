"""1 GiB streamed each way in bounded memory, measured in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("memory_probe.py")
GiB = 1024**3
MiB = 1024**2
MAX_RSS = 200 * MiB


def test_one_gib_each_way_in_bounded_memory() -> None:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    # Both directions at once, in separate processes: each ru_maxrss covers one direction.
    procs = {
        direction: subprocess.Popen(
            [sys.executable, str(PROBE), direction],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for direction in ("arg", "reply")
    }
    results = {}
    try:
        for direction, proc in procs.items():
            out, err = proc.communicate(timeout=100)
            assert proc.returncode == 0, f"{direction} probe failed:\n{err}"
            results[direction] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for direction, r in results.items():
        assert r["bytes"] == GiB, (direction, r)
        assert r["crc"] == r["expected_crc"], (direction, r)
        assert r["maxrss"] < MAX_RSS, f"{direction}: peak RSS {r['maxrss'] / MiB:.0f} MiB"
