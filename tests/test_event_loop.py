"""bigpool's own event loops: uvloop's when it is installed, asyncio's when
``$BIGPOOL_EVENT_LOOP=asyncio`` (the driver's loop thread, in-process and process machines, and
the pool's worker channels on both)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from loop_support import ASYNCIO, UVLOOP, expected_loop_name

import bigpool
import bigpool.worker
from bigpool import BigPool, State
from bigpool.h2rpc.loop import ENV_EVENT_LOOP, LoopThread, _run_without_runner, new_event_loop, run

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")


def _name(loop: asyncio.AbstractEventLoop) -> str:
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


async def _running_loop_name() -> str:
    return _name(asyncio.get_running_loop())


@pytest.fixture
def default_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``$BIGPOOL_EVENT_LOOP``: the default choice."""
    monkeypatch.delenv(ENV_EVENT_LOOP, raising=False)


def _made(monkeypatch: pytest.MonkeyPatch, value: str | None) -> str:
    if value is None:
        monkeypatch.delenv(ENV_EVENT_LOOP, raising=False)
    else:
        monkeypatch.setenv(ENV_EVENT_LOOP, value)
    loop = new_event_loop()
    try:
        return _name(loop)
    finally:
        loop.close()


@needs_uvloop
def test_new_event_loop_is_uvloop_unless_asyncio_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _made(monkeypatch, None) == UVLOOP
    assert _made(monkeypatch, "") == UVLOOP
    assert _made(monkeypatch, "uvloop") == UVLOOP
    assert _made(monkeypatch, "asyncio") == ASYNCIO
    assert _made(monkeypatch, " AsyncIO ") == ASYNCIO


def test_new_event_loop_without_uvloop_and_a_bad_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # "import uvloop" now raises ImportError
    assert _made(monkeypatch, None) == ASYNCIO
    monkeypatch.setenv(ENV_EVENT_LOOP, "uvloop")
    with pytest.raises(ImportError):
        new_event_loop()
    monkeypatch.setenv(ENV_EVENT_LOOP, "tokio")
    with pytest.raises(ValueError, match=ENV_EVENT_LOOP):
        new_event_loop()


@pytest.mark.parametrize("choice", [None, "asyncio"])
def test_loop_thread_and_run_use_new_event_loop(
    monkeypatch: pytest.MonkeyPatch, choice: str | None
) -> None:
    if choice is None:
        monkeypatch.delenv(ENV_EVENT_LOOP, raising=False)
    else:
        monkeypatch.setenv(ENV_EVENT_LOOP, choice)
    expected = expected_loop_name()
    lt = LoopThread("test-loop-choice")
    try:
        assert _name(lt.loop) == expected
        assert lt.run(_running_loop_name(), timeout=10) == expected
    finally:
        lt.close()
    assert run(_running_loop_name()) == expected
    assert _run_without_runner(_running_loop_name()) == expected


@pytest.mark.parametrize("runner", [run, _run_without_runner], ids=["run", "without-runner"])
def test_run_cleans_up_as_asyncio_run_does(
    default_loop: None, runner: Any
) -> None:
    """Tasks still running are cancelled, async generators finalised, the loop closed."""
    seen: dict[str, Any] = {}

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise

    async def numbers() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            seen["finalised"] = True

    async def main() -> int:
        seen["loop"] = asyncio.get_running_loop()
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0)
        gen = numbers()
        seen["gen"] = gen  # kept alive: shutdown_asyncgens, not the collector, finalises it
        return await gen.__anext__()

    assert runner(main()) == 1
    assert seen["cancelled"] and seen["finalised"]
    assert seen["loop"].is_closed()
    assert _name(seen["loop"]) == expected_loop_name()


class Echo:
    def echo(self, x: Any) -> Any:
        return x


def _started(b: bigpool.B) -> bigpool.Machine:
    (m,) = b.start(1, services={"Echo": Echo()})
    assert m.wait(State.RUNNING, timeout=60) is State.RUNNING, m.err()
    return m


@pytest.mark.parametrize("system", ["test", "local"])
def test_driver_and_machines_run_on_new_event_loop(default_loop: None, system: str) -> None:
    expected = expected_loop_name()
    with bigpool.start(system) as b:
        assert _name(b._loop) == expected
        m = _started(b)
        assert m.call("Supervisor.info", timeout=30)["event_loop"] == expected
        assert m.call("Echo.echo", "over TLS", timeout=30) == "over TLS"


@needs_uvloop
@pytest.mark.parametrize("system", ["test", "local"])
def test_bigpool_event_loop_asyncio_reaches_driver_machines_and_workers(
    monkeypatch: pytest.MonkeyPatch, system: str
) -> None:
    """The stdlib loop is still a whole working bigpool (a local machine inherits the
    variable), pool workers included."""
    monkeypatch.setenv(ENV_EVENT_LOOP, "asyncio")
    with BigPool(processes=2, system=system) as pool:
        assert _name(pool._b._loop) == ASYNCIO
        assert pool.map(abs, range(-50, 50)) == [abs(x) for x in range(-50, 50)]
        assert pool.apply(pow, (2, 10)) == 1024
        for m in pool.machines:
            assert m.call("Supervisor.info", timeout=30)["event_loop"] == ASYNCIO
