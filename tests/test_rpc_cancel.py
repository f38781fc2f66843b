"""Timeouts and cancellation: the caller gives up, and the server-side call learns of it."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import pytest

from bigpool.h2rpc import CallTimeoutError, StreamBrokenError, current_call, wire

DEADLINE = 10.0  # generous bound on waits for things that should happen within a second


class Sleeper:
    """Methods that block until their call is cancelled, recording what they saw."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cancelled_at: float | None = None
        self.thread_started = threading.Event()
        self.thread_saw_cancel = threading.Event()

    async def forever(self, _: Any = None) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled_at = time.monotonic()
            self.cancelled.set()
            raise

    def spin(self, _: Any = None) -> str:
        call = current_call()
        self.thread_started.set()
        # Loop until the caller's cancellation reaches us; give up after a long bound so a
        # broken server cannot hang the thread pool forever.
        if call.cancelled.wait(DEADLINE):
            self.thread_saw_cancel.set()
            return "cancelled"
        return "never cancelled"


async def test_timeout_raises_call_timeout_and_cancels_server_coroutine(make_rpc: Any) -> None:
    svc = Sleeper()
    rpc = await make_rpc({"S": svc})
    with pytest.raises(CallTimeoutError) as info:
        await rpc.call("S.forever", timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.method == "S.forever" and info.value.timeout == 0.2
    assert svc.started.is_set()
    await asyncio.wait_for(svc.cancelled.wait(), DEADLINE)


async def test_cancelling_caller_task_cancels_server_coroutine(make_rpc: Any) -> None:
    svc = Sleeper()
    rpc = await make_rpc({"S": svc})
    task = asyncio.create_task(rpc.call("S.forever"))
    await asyncio.wait_for(svc.started.wait(), DEADLINE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(svc.cancelled.wait(), DEADLINE)
    # The connection is still good for the next call.
    svc.started.clear()
    svc.cancelled.clear()
    with pytest.raises(CallTimeoutError):
        await rpc.call("S.forever", timeout=0.1)
    await asyncio.wait_for(svc.cancelled.wait(), DEADLINE)


async def test_thread_method_sees_cancelled_after_timeout(make_rpc: Any) -> None:
    svc = Sleeper()
    rpc = await make_rpc({"S": svc})
    with pytest.raises(CallTimeoutError):
        await rpc.call("S.spin", timeout=0.2)
    assert svc.thread_started.is_set()
    assert await asyncio.to_thread(svc.thread_saw_cancel.wait, DEADLINE)


async def test_thread_method_sees_cancelled_after_caller_cancel(make_rpc: Any) -> None:
    svc = Sleeper()
    rpc = await make_rpc({"S": svc})
    task = asyncio.create_task(rpc.call("S.spin"))
    assert await asyncio.to_thread(svc.thread_started.wait, DEADLINE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(svc.thread_saw_cancel.wait, DEADLINE)


async def test_server_enforces_timeout_header_without_client_timer(make_rpc: Any) -> None:
    """A request carrying ``bigrpc-timeout`` is cancelled by the server itself."""
    svc = Sleeper()
    rpc = await make_rpc({"S": svc})
    conn = await rpc.client.connection(rpc.addr)
    headers = wire.request_headers(
        conn.addr.encode("ascii"), wire.method_path("S.forever"), streamed=False, timeout=0.3
    )
    sent_at = time.monotonic()
    stream = await conn.open_stream(headers, end_stream=True)
    try:
        await asyncio.wait_for(svc.cancelled.wait(), DEADLINE)
        assert svc.cancelled_at is not None
        elapsed = svc.cancelled_at - sent_at
        assert 0.25 <= elapsed < 5, elapsed
        # The server abandons the stream: the raw caller learns it failed, not that it succeeded.
        with pytest.raises(StreamBrokenError):
            await asyncio.wait_for(stream.wait_headers(), DEADLINE)
    finally:
        conn.reset_stream(stream.id)


async def test_server_deadline_sets_cancelled_for_thread_method(make_rpc: Any) -> None:
    svc = Sleeper()
    rpc = await make_rpc({"S": svc})
    conn = await rpc.client.connection(rpc.addr)
    headers = wire.request_headers(
        conn.addr.encode("ascii"), wire.method_path("S.spin"), streamed=False, timeout=0.3
    )
    stream = await conn.open_stream(headers, end_stream=True)
    try:
        assert await asyncio.to_thread(svc.thread_saw_cancel.wait, DEADLINE)
    finally:
        conn.reset_stream(stream.id)


async def test_server_closing_mid_call_is_a_network_error_and_cancels(make_rpc: Any) -> None:
    from bigpool.h2rpc import ConnectionLostError, NetworkError

    svc = Sleeper()
    rpc = await make_rpc({"S": svc})
    task = asyncio.create_task(rpc.call("S.forever"))
    try:
        await asyncio.wait_for(svc.started.wait(), DEADLINE)
        await rpc.server.close()
        with pytest.raises(NetworkError) as info:
            await asyncio.wait_for(task, DEADLINE)
        assert isinstance(info.value, ConnectionLostError)
        assert info.value.temporary
        await asyncio.wait_for(svc.cancelled.wait(), DEADLINE)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_call_failing_as_its_caller_is_cancelled_logs_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller is cancelled while the call fails (as when a machine's connection is refused
    during shutdown): asyncio logs no unretrieved error for the call (Python 3.11's wait_for
    gives the caller the cancellation and drops the error; later versions give the error)."""
    from bigpool.h2rpc import Client, NetworkError

    entered = asyncio.Event()

    async def refused(self: Client, addr: str, method: str, arg: Any, timeout: Any) -> Any:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # What a connect that failed as it was cancelled gives: an error, not the cancel.
            raise NetworkError("cannot connect: refused", addr=addr) from None

    monkeypatch.setattr(Client, "_call", refused)
    loop = asyncio.get_running_loop()
    logged: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: logged.append(context))
    try:
        client = Client(None)
        caller = asyncio.ensure_future(
            client.call("https://127.0.0.1:9/", "S.m", None, timeout=DEADLINE))
        await asyncio.wait_for(entered.wait(), DEADLINE)
        caller.cancel()
        with pytest.raises((asyncio.CancelledError, NetworkError)):
            await caller
        del caller
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()  # an unretrieved error is logged when its task is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not [c for c in logged if "never retrieved" in str(c.get("message"))], logged
