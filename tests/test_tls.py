"""The TLS settings both ends use, and what each end refuses."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import warnings
from typing import Any

import pytest

from bigpool.h2rpc import Authority, Client, Credentials, NetworkError, Server


class Echo:
    def __init__(self) -> None:
        self.calls = 0

    async def echo(self, x: Any) -> Any:
        self.calls += 1
        return x


@pytest.mark.parametrize("side", ["server", "client"])
def test_contexts_demand_tls12_aead_forward_secrecy_and_verification(
    server_credentials: Credentials, side: str
) -> None:
    ctx = (
        server_credentials.server_context() if side == "server"
        else server_credentials.client_context()
    )
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION
    if side == "client":
        assert ctx.check_hostname
    ciphers = ctx.get_ciphers()
    assert ciphers
    for cipher in ciphers:
        assert cipher["aead"], cipher["name"]
        if cipher["protocol"] == "TLSv1.2":
            # Forward secret: ephemeral key exchange; and no RSA key transport, no CBC, no NULL.
            assert cipher["kea"] == "kx-ecdhe", cipher["name"]
            assert "CBC" not in cipher["description"] and "NULL" not in cipher["name"]


async def _serve(creds: Credentials, echo: Echo) -> tuple[Server, int]:
    server = Server(creds.server_context())
    server.register("E", echo)
    _, port = await server.start("127.0.0.1", 0)
    return server, port


async def test_tls11_client_is_refused_and_tls12_accepted(
    server_credentials: Credentials, client_credentials: Credentials
) -> None:
    echo = Echo()
    server, port = await _serve(server_credentials, echo)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = client_credentials.client_context()
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        with pytest.raises((ssl.SSLError, ConnectionError)) as info:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
            )
            writer.close()
        # Refused by the server, not unable to offer TLS 1.1 in the first place.
        assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value)
        assert server.connection_count == 0

        ctx12 = client_credentials.client_context()
        ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
        client = Client(ctx12)
        try:
            assert await client.call(f"127.0.0.1:{port}", "E.echo", 12) == 12
            conn = next(iter(client._connections.values()))
            assert conn.transport is not None
            assert conn.transport.get_extra_info("ssl_object").version() == "TLSv1.2"
        finally:
            await client.close()
    finally:
        await server.close()


async def _client_refuses(server_creds: Credentials, client_creds: Credentials) -> None:
    echo = Echo()
    server, port = await _serve(server_creds, echo)
    client = Client(client_creds.client_context())
    try:
        with pytest.raises(NetworkError):
            await client.call(f"127.0.0.1:{port}", "E.echo", 1, timeout=10)
        assert echo.calls == 0
    finally:
        await client.close()
        await server.close()


async def test_client_refuses_server_from_another_ca(client_credentials: Credentials) -> None:
    impostor = Authority.create("impostor CA").issue("server", ips=["127.0.0.1"])
    # The impostor trusts our CA, so only the client's check can stop the call.
    impostor = Credentials(impostor.cert_pem, impostor.key_pem, client_credentials.ca_pem)
    await _client_refuses(impostor, client_credentials)


async def test_client_refuses_server_not_named_for_the_host_dialled(
    authority: Authority, client_credentials: Credentials
) -> None:
    elsewhere = authority.issue("server", ips=["10.9.8.7"], dns=["elsewhere.example"])
    await _client_refuses(elsewhere, client_credentials)
    # A DNS name never matches a dialled IP address, even "localhost" for 127.0.0.1.
    await _client_refuses(authority.issue("server", dns=["localhost"]), client_credentials)


async def test_client_refuses_expired_server(
    authority: Authority, client_credentials: Credentials
) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = authority.issue(
        "server", ips=["127.0.0.1"], not_before=now - datetime.timedelta(days=3),
        lifetime=datetime.timedelta(hours=1),
    )
    await _client_refuses(expired, client_credentials)


async def test_good_credentials_work(
    server_credentials: Credentials, client_credentials: Credentials
) -> None:
    echo = Echo()
    server, port = await _serve(server_credentials, echo)
    client = Client(client_credentials.client_context())
    try:
        assert await client.call(f"127.0.0.1:{port}", "E.echo", "ok") == "ok"
        peer_cert = next(iter(server._connections))._peer_certificate
        assert peer_cert is not None
        assert dict(x[0] for x in peer_cert["subject"])["commonName"] == "test-client"
    finally:
        await client.close()
        await server.close()
