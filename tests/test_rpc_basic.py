"""Round trips of ordinary values and the basic error paths over real TLS sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bigpool.h2rpc import MethodNotFoundError, NetworkError, RemoteTraceback


class Echo:
    async def echo(self, x: Any) -> Any:
        return x

    def echo_in_thread(self, x: Any) -> Any:
        return x

    def fail(self, x: Any) -> None:
        raise KeyError(x)


VALUES = [None, 0, -(2**70), 3.5, "héllo", b"\x00\xff" * 1000, (1, [2, {"a": 3}]), {1, 2},
          list(range(10000))]


@pytest.mark.parametrize("method", ["E.echo", "E.echo_in_thread"])
async def test_round_trip_of_ordinary_values(make_rpc: Any, method: str) -> None:
    rpc = await make_rpc({"E": Echo()})
    for value in VALUES:
        assert await rpc.call(method, value) == value


async def test_closures_travel_by_dill(make_rpc: Any) -> None:
    rpc = await make_rpc({"E": Echo()})
    k = 7
    f = await rpc.call("E.echo", lambda x: x * k)
    assert f(6) == 42


async def test_remote_exception_keeps_type_and_traceback(make_rpc: Any) -> None:
    rpc = await make_rpc({"E": Echo()})
    with pytest.raises(KeyError) as info:
        await rpc.call("E.fail", "missing")
    assert info.value.args == ("missing",)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in fail" in str(info.value.__cause__)


async def test_unknown_method_names_what_was_asked(make_rpc: Any) -> None:
    rpc = await make_rpc({"E": Echo()})
    with pytest.raises(MethodNotFoundError, match="'nope'"):
        await rpc.call("E.nope")
    with pytest.raises(MethodNotFoundError, match="no service 'X'"):
        await rpc.call("X.echo")


async def test_many_concurrent_calls_share_one_connection(make_rpc: Any) -> None:
    rpc = await make_rpc({"E": Echo()})
    results = await asyncio.gather(*(rpc.call("E.echo", i) for i in range(1000)))
    assert results == list(range(1000))
    assert rpc.server.connection_count == 1


async def test_a_connection_finishing_after_close_is_closed_not_kept(
    make_rpc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rpc = await make_rpc({"E": Echo()})
    connected = asyncio.Event()
    release = asyncio.Event()
    real_connect = type(rpc.client)._connect
    made: list[Any] = []

    async def slow_connect(self: Any, addr: str) -> Any:
        conn = await real_connect(self, addr)
        made.append(conn)
        connected.set()
        await release.wait()  # close() runs now, while this connection is still ours alone
        return conn

    monkeypatch.setattr(type(rpc.client), "_connect", slow_connect)
    call = asyncio.ensure_future(rpc.call("E.echo", 1))
    await asyncio.wait_for(connected.wait(), 10)
    await rpc.client.close()
    release.set()
    with pytest.raises(NetworkError, match="client is closed"):
        await call
    await asyncio.wait_for(made[0].closed_event.wait(), 10)
    assert not rpc.client._connections
