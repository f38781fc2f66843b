"""Recording the figures the reliability tests measure.

Each measurement is printed (``pytest -s`` shows it) as ``RELIABILITY {json}`` and, when
``BIGPOOL_RELIABILITY_LOG`` names a file, appended to it as one JSON line: what
``docs/reliability.md`` is filled from.
"""

from __future__ import annotations

import json
import os
from typing import Any


def soak_long() -> bool:
    """Whether the long versions were asked for (``BIGPOOL_SOAK=long``)."""
    return os.environ.get("BIGPOOL_SOAK", "").lower() == "long"


def record(scenario: str, **figures: Any) -> None:
    line = json.dumps({"scenario": scenario, **figures}, sort_keys=True, default=str)
    print(f"RELIABILITY {line}", flush=True)
    path = os.environ.get("BIGPOOL_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
