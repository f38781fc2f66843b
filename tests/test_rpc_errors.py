"""How failures reach the caller: remote exceptions, pickling failures, bad names, the network."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from bigpool.h2rpc import (
    BadRequestError,
    BigpoolError,
    Client,
    Credentials,
    NetworkError,
    RemoteError,
    RemoteTraceback,
)

DEADLINE = 10.0


class UnpicklableError(Exception):
    """An exception that cannot be pickled, even by dill: it holds thread-local state."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.local = threading.local()


class Faulty:
    def __init__(self) -> None:
        self.calls = 0

    def raise_unpicklable(self, message: str) -> None:
        raise UnpicklableError(message)

    async def reply_unpicklable(self, _: Any = None) -> Any:
        return threading.local()

    def count(self, _: Any = None) -> int:
        self.calls += 1
        return self.calls

    def raise_value_error(self, _: Any = None) -> None:
        raise ValueError("plain")


async def test_unpicklable_exception_arrives_as_remote_error(make_rpc: Any) -> None:
    rpc = await make_rpc({"F": Faulty()})
    with pytest.raises(RemoteError) as info:
        await rpc.call("F.raise_unpicklable", "it is locked", timeout=DEADLINE)
    err = info.value
    assert err.type_name.endswith("UnpicklableError")
    assert err.message == "it is locked"
    assert "raise_unpicklable" in err.remote_traceback
    assert "UnpicklableError" in err.remote_traceback
    assert isinstance(err.__cause__, RemoteTraceback)
    assert not err.temporary


async def test_unpicklable_reply_is_a_type_error_naming_the_method(make_rpc: Any) -> None:
    rpc = await make_rpc({"F": Faulty()})
    with pytest.raises(TypeError, match=r"F\.reply_unpicklable") as info:
        await rpc.call("F.reply_unpicklable", timeout=DEADLINE)
    assert "could not be pickled" in str(info.value)
    # The connection survives for the next call.
    assert await rpc.call("F.count", timeout=DEADLINE) == 1


async def test_unpicklable_argument_fails_at_the_caller_before_sending(make_rpc: Any) -> None:
    svc = Faulty()
    rpc = await make_rpc({"F": svc})
    with pytest.raises(TypeError):
        await rpc.call("F.count", threading.local(), timeout=DEADLINE)
    # Nothing reached the server: the first call it sees is the next one.
    assert await rpc.call("F.count", timeout=DEADLINE) == 1


@pytest.mark.parametrize("name", ["noservice", "a.b.c", ".m", "S.", ""])
async def test_malformed_method_names_are_refused_clearly(make_rpc: Any, name: str) -> None:
    rpc = await make_rpc({"F": Faulty()})
    with pytest.raises(BadRequestError, match=r"Service\.method"):
        await rpc.call(name, timeout=DEADLINE)


async def test_bad_content_type_is_rejected_by_the_server(make_rpc: Any) -> None:
    from bigpool.h2rpc import wire

    rpc = await make_rpc({"F": Faulty()})
    conn = await rpc.client.connection(rpc.addr)
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", conn.addr.encode()),
        (b":path", b"/bigrpc/F.count"),
        (b"content-type", b"text/plain"),
    ]
    stream = await conn.open_stream(headers, end_stream=True)
    status, ctype = wire.parse_response(await asyncio.wait_for(stream.wait_headers(), DEADLINE))
    body = await asyncio.wait_for(stream.read_all(1 << 20), DEADLINE)
    assert status == wire.STATUS_BAD_REQUEST
    err = wire.response_error(status, ctype, body)
    assert isinstance(err, BadRequestError)
    assert "content-type" in str(err)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_network_error_is_temporary_and_not_remote(client_credentials: Credentials) -> None:
    client = Client(client_credentials.client_context(), connect_timeout=DEADLINE)
    try:
        addr = f"127.0.0.1:{closed_port()}"
        with pytest.raises(NetworkError) as info:
            await client.call(addr, "F.count", timeout=DEADLINE)
    finally:
        await client.close()
    err = info.value
    assert err.temporary is True
    assert isinstance(err, BigpoolError)
    assert not isinstance(err, RemoteError)
    assert not isinstance(err.__cause__, RemoteTraceback)
    assert err.addr == addr


async def test_remote_exceptions_are_not_temporary(make_rpc: Any) -> None:
    rpc = await make_rpc({"F": Faulty()})
    with pytest.raises(ValueError) as info:
        await rpc.call("F.raise_value_error", timeout=DEADLINE)
    assert not getattr(info.value, "temporary", False)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    with pytest.raises(RemoteError) as info2:
        await rpc.call("F.raise_unpicklable", "x", timeout=DEADLINE)
    assert info2.value.temporary is False


async def test_method_taking_no_argument_rejects_one(make_rpc: Any) -> None:
    class NoArg:
        def ping(self) -> str:
            return "pong"

    rpc = await make_rpc({"N": NoArg()})
    assert await rpc.call("N.ping", timeout=DEADLINE) == "pong"
    with pytest.raises(TypeError, match="takes no argument"):
        await rpc.call("N.ping", 1, timeout=DEADLINE)


async def test_private_methods_are_not_callable(make_rpc: Any) -> None:
    from bigpool.h2rpc import MethodNotFoundError

    rpc = await make_rpc({"F": Faulty()})
    with pytest.raises(MethodNotFoundError):
        await rpc.call("F._secret", timeout=DEADLINE)
    with pytest.raises(MethodNotFoundError):
        await rpc.call("F.__init__", timeout=DEADLINE)
