"""The bigpi example runs end to end on local machines and estimates π."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

BIGPI = Path(__file__).resolve().parent.parent / "examples" / "bigpi.py"


def test_bigpi_estimates_pi_on_two_local_machines(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BIGPI), "-n", "200000", "--nmach", "2", "--bigpool-system", "local"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # import the installed bigpool, not a checkout in the working directory
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    match = re.search(r"^π = (\d+\.\d+)$", proc.stdout, re.MULTILINE)
    assert match, output
    digits = match.group(1)
    assert len(digits.split(".")[1]) == 5, digits  # int(log10(200000)) decimals
    # 200000 samples: the estimate's standard deviation is about 0.0037.
    assert abs(float(digits) - math.pi) < 0.03, output
    running = re.findall(r"machine (https://\S+) RUNNING", proc.stderr)
    assert len(set(running)) == 2, output
    assert "distributing work among 2 cores" in proc.stderr, output
    assert re.search(r"total=\d+ nsamples=200000", proc.stderr), output


def test_bigpi_fails_clearly_for_an_unknown_system(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BIGPI), "-n", "1000", "--bigpool-system", "no-such-system"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bigpi failed" in proc.stderr and "no-such-system" in proc.stderr, proc.stderr


def test_pi_string_rounds_to_the_warranted_precision() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bigpi_example", BIGPI)
    assert spec is not None and spec.loader is not None
    bigpi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bigpi)
    assert bigpi.pi_string(7853881995, 10_000_000_000) == "3.1415527980"  # the Go walkthrough's
    assert bigpi.pi_string(785398, 1_000_000) == "3.141592"
    assert bigpi.pi_string(7, 10) == "2.8"
    assert bigpi.pi_string(3, 4) == "3"
    assert bigpi.pi_string(1, 8) == "1"  # 0.5 rounds half up
    assert bigpi.split(10, 3) == [4, 3, 3]
    assert sum(bigpi.split(200_001, 7)) == 200_001
