"""Shared fixtures: a certificate authority, and RPC servers that are always shut down."""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bigpool.h2rpc import Authority, Client, Credentials, Server

faulthandler.enable(file=sys.stderr, all_threads=True)


@pytest.fixture(scope="session")
def authority() -> Authority:
    return Authority.create()


@pytest.fixture(scope="session")
def server_credentials(authority: Authority) -> Credentials:
    return authority.issue("test-server", ips=["127.0.0.1"], dns=["localhost"])


@pytest.fixture(scope="session")
def client_credentials(authority: Authority) -> Credentials:
    return authority.issue("test-client")


@dataclass
class RpcPair:
    """A running server and a client that trusts it; ``addr`` is where the server listens."""

    server: Server
    client: Client
    addr: str

    async def call(self, method: str, arg: Any = None, **kw: Any) -> Any:
        return await self.client.call(self.addr, method, arg, **kw)


@pytest.fixture
async def make_rpc(
    server_credentials: Credentials, client_credentials: Credentials
) -> AsyncIterator[Any]:
    """``await make_rpc(services)`` starts a TLS server with ``services`` and a client for it.

    Every server and client made is closed when the test ends, pass or fail.
    """
    pairs: list[RpcPair] = []

    async def make(services: dict[str, object], **server_kw: Any) -> RpcPair:
        server = Server(server_credentials.server_context(), **server_kw)
        for name, obj in services.items():
            server.register(name, obj)
        host, port = await server.start("127.0.0.1", 0)
        pair = RpcPair(server, Client(client_credentials.client_context()), f"{host}:{port}")
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        await pair.client.close()
        await pair.server.close()
