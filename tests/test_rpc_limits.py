"""Calls beyond the server's stream limit wait their turn instead of failing."""

from __future__ import annotations

import asyncio
from typing import Any

DEADLINE = 20.0


class Gate:
    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.done = 0
        self.changed = asyncio.Condition()
        self.release = asyncio.Event()

    async def block(self, i: int) -> int:
        async with self.changed:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.changed.notify_all()
        try:
            await self.release.wait()
        finally:
            async with self.changed:
                self.running -= 1
                self.done += 1
                self.changed.notify_all()
        return i


async def test_calls_queue_at_the_stream_limit(make_rpc: Any) -> None:
    gate = Gate()
    rpc = await make_rpc({"G": gate}, max_concurrent_streams=4)
    # Learn the server's settings first, so the limit is known before the burst.
    await rpc.client.connection(rpc.addr)
    tasks = [asyncio.create_task(rpc.call("G.block", i)) for i in range(50)]
    try:
        async with gate.changed:
            await asyncio.wait_for(gate.changed.wait_for(lambda: gate.running == 4), DEADLINE)
        # The rest are waiting at the client, not failing: none has finished.
        assert not any(t.done() for t in tasks)
        gate.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    finally:
        gate.release.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert results == list(range(50))
    assert gate.done == 50
    assert gate.peak == 4


async def test_calls_queue_at_the_stream_limit_on_a_fresh_connection(make_rpc: Any) -> None:
    """The burst starts before the connection (and the server's SETTINGS) exist."""
    gate = Gate()
    rpc = await make_rpc({"G": gate}, max_concurrent_streams=4)
    tasks = [asyncio.create_task(rpc.call("G.block", i)) for i in range(50)]
    try:
        async with gate.changed:
            await asyncio.wait_for(gate.changed.wait_for(lambda: gate.running >= 4), DEADLINE)
        gate.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    finally:
        gate.release.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert results == list(range(50))
    assert gate.peak <= 4


async def test_cancelled_waiters_do_not_leak_slots(make_rpc: Any) -> None:
    gate = Gate()
    rpc = await make_rpc({"G": gate}, max_concurrent_streams=2)
    await rpc.client.connection(rpc.addr)
    tasks = [asyncio.create_task(rpc.call("G.block", i)) for i in range(10)]
    try:
        async with gate.changed:
            await asyncio.wait_for(gate.changed.wait_for(lambda: gate.running == 2), DEADLINE)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with gate.changed:
            await asyncio.wait_for(gate.changed.wait_for(lambda: gate.running == 0), DEADLINE)
        gate.release.set()
        # Every slot is free again: a new burst runs to completion.
        results = await asyncio.wait_for(
            asyncio.gather(*(rpc.call("G.block", i) for i in range(6))), DEADLINE
        )
    finally:
        gate.release.set()
    assert results == list(range(6))
