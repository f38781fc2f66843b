"""The certificate authority: what it issues, how it is kept, and what TLS makes of it."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from bigpool.h2rpc import Authority, Client, Credentials, NetworkError, Server
from bigpool.h2rpc.authority import CLOCK_SKEW

DEADLINE = 10.0


def leaf(creds: Credentials) -> x509.Certificate:
    return x509.load_pem_x509_certificate(creds.cert_pem)


def test_leaf_has_requested_sans_and_bounded_lifetime(authority: Authority) -> None:
    lifetime = datetime.timedelta(hours=2)
    creds = authority.issue(
        "m1", ips=["10.0.0.7", "::1"], dns=["m1.example", "localhost"], lifetime=lifetime
    )
    cert = leaf(creds)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"m1.example", "localhost"}
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime < validity <= lifetime + CLOCK_SKEW
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    assert cert.issuer == authority.cert.subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert creds.ca_pem == authority.cert_pem


def test_leaf_lifetime_must_be_positive(authority: Authority) -> None:
    with pytest.raises(ValueError, match="positive"):
        authority.issue("x", lifetime=datetime.timedelta(0))


def test_credentials_repr_hides_the_key(authority: Authority) -> None:
    creds = authority.issue("m")
    text = repr(creds) + str(creds)
    assert "PRIVATE KEY" not in text
    assert creds.key_pem.decode() not in text
    assert "hidden" in text
    assert "key hidden" in repr(authority)


def test_save_writes_a_private_file_and_loads_back(tmp_path: Path, authority: Authority) -> None:
    path = tmp_path / "ca.pem"
    authority.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Authority.load_or_create(path)
    assert loaded.cert == authority.cert
    # The loaded key is the same key: a leaf it issues verifies against the original CA.
    cert = leaf(loaded.issue("m"))
    cert.verify_directly_issued_by(authority.cert)


def test_load_or_create_creates_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "new-ca.pem"
    created = Authority.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Authority.load_or_create(path).cert == created.cert
    assert [p.name for p in tmp_path.iterdir()] == ["new-ca.pem"]  # no temporary left behind


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_load_or_create_refuses_a_file_others_can_read(
    tmp_path: Path, authority: Authority, mode: int
) -> None:
    path = tmp_path / "ca.pem"
    authority.save(path)
    os.chmod(path, mode)
    with pytest.raises(PermissionError, match="chmod 600"):
        Authority.load_or_create(path)


async def test_client_rejects_server_whose_san_does_not_match(
    authority: Authority, client_credentials: Credentials
) -> None:
    class Svc:
        def ping(self) -> str:
            return "pong"

    wrong = authority.issue("elsewhere", ips=["10.9.9.9"], dns=["elsewhere.example"])
    server = Server(wrong.server_context())
    server.register("S", Svc())
    client = Client(client_credentials.client_context(), connect_timeout=DEADLINE)
    try:
        host, port = await server.start("127.0.0.1", 0)
        with pytest.raises(NetworkError, match="TLS") as info:
            await client.call(f"{host}:{port}", "S.ping", timeout=DEADLINE)
        assert "127.0.0.1" in str(info.value.__cause__)
    finally:
        await client.close()
        await server.close()


async def test_client_rejects_server_from_another_authority(
    client_credentials: Credentials,
) -> None:
    other = Authority.create("impostor CA").issue("s", ips=["127.0.0.1"])
    server = Server(other.server_context())
    client = Client(client_credentials.client_context(), connect_timeout=DEADLINE)
    try:
        host, port = await server.start("127.0.0.1", 0)
        with pytest.raises(NetworkError, match="TLS"):
            await client.call(f"{host}:{port}", "S.ping", timeout=DEADLINE)
    finally:
        await client.close()
        await server.close()


async def test_server_rejects_client_from_another_authority(
    make_rpc: Any, authority: Authority
) -> None:
    class Svc:
        def ping(self) -> str:
            return "pong"

    rpc = await make_rpc({"S": Svc()})
    assert await rpc.call("S.ping", timeout=DEADLINE) == "pong"
    # The intruder trusts our CA (so its own check of the server passes) but its leaf is
    # signed by another: only the server's check of the client can stop it.
    foreign = Authority.create("impostor CA").issue("intruder")
    intruder = Credentials(foreign.cert_pem, foreign.key_pem, ca_pem=authority.cert_pem)
    client = Client(intruder.client_context(), connect_timeout=DEADLINE)
    try:
        with pytest.raises(NetworkError):
            await client.call(rpc.addr, "S.ping", timeout=DEADLINE)
    finally:
        await client.close()
