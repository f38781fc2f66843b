"""Which event loop bigpool's own loops should be, here (see bigpool.h2rpc.loop)."""

from __future__ import annotations

import importlib.util
import os

UVLOOP = "uvloop.Loop"
ASYNCIO = "asyncio.unix_events._UnixSelectorEventLoop"


def expected_loop_name() -> str:
    """``module.Class`` of the loop ``new_event_loop()`` makes in this environment: uvloop's
    when it is installed, unless ``$BIGPOOL_EVENT_LOOP`` is ``asyncio``."""
    if os.environ.get("BIGPOOL_EVENT_LOOP", "").strip().lower() == "asyncio":
        return ASYNCIO
    return UVLOOP if importlib.util.find_spec("uvloop") is not None else ASYNCIO
