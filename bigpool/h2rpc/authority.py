"""An in-process certificate authority for mutually authenticated TLS between machines.

The driver makes one :class:`Authority`; it alone holds the CA's private key. Each machine (and
the driver itself) gets :class:`Credentials`: its own leaf key and certificate, and the CA
certificate, never the CA key. Both ends of every connection present a leaf signed by the CA
and verify the other's, so a peer without such a certificate cannot speak RPC at all.

Keys are ECDSA P-256; signatures SHA-256. TLS is 1.2 or newer, ALPN ``h2``, forward-secret
AEAD cipher suites only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .credentials import TLS12_CIPHERS, Credentials

__all__ = ["TLS12_CIPHERS", "Authority", "Credentials"]

# Leaf certificates are short-lived: a machine lives for one driver session. A week bounds the
# harm of a leaked leaf while outliving any sensible session; callers may ask for less.
DEFAULT_LEAF_LIFETIME = datetime.timedelta(days=7)
CA_LIFETIME = datetime.timedelta(days=365)
# Clocks on freshly booted machines can lag; certificates are valid from a little in the past.
CLOCK_SKEW = datetime.timedelta(minutes=10)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """A certificate authority: an ECDSA P-256 key and a self-signed CA certificate.

    Made in memory with :meth:`create`, or kept in a PEM file (mode 0600, key and certificate
    together) with :meth:`load_or_create`.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert

    def __repr__(self) -> str:
        return f"Authority({self.cert.subject.rfc4514_string()}, <key hidden>)"

    @classmethod
    def create(cls, name: str = "bigpool CA") -> Authority:
        """A new authority whose key exists only in this process."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Authority:
        """The authority kept at ``path``, made and saved there (mode 0600) if absent.

        Raises ``PermissionError`` if the file is readable by anyone but its owner, since the
        CA key lets its holder impersonate every machine.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            authority = cls.create()
            authority.save(path)
            return authority
        if st.st_mode & 0o077:
            raise PermissionError(
                f"CA file {os.fspath(path)!r} has mode {st.st_mode & 0o777:#o}; it holds the CA "
                "private key and must be private to its owner (chmod 600)"
            )
        with open(path, "rb") as f:
            data = f.read()
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"CA file {os.fspath(path)!r} does not hold an EC private key")
        cert = x509.load_pem_x509_certificate(data)
        return cls(key, cert)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write key and certificate to ``path`` with mode 0600, atomically."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".bigpool-ca-", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_pem_key(self._key))
                f.write(self.cert_pem)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM: what every party trusts."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
        lifetime: datetime.timedelta = DEFAULT_LEAF_LIFETIME,
        not_before: datetime.datetime | None = None,
        client_auth: bool = True,
    ) -> Credentials:
        """A new leaf key and certificate signed by this authority.

        ``ips`` and ``dns`` become subject alternative names: a client verifying this leaf as
        a server checks the host it dialled against them. The leaf is good for both server and
        client authentication, or only the former with ``client_auth=False`` (a leaf that must
        never call anyone). ``lifetime`` bounds its validity (it must be positive).
        """
        if lifetime <= datetime.timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, not {lifetime}")
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        names += [x509.DNSName(d) for d in dns]
        key = ec.generate_private_key(ec.SECP256R1())
        start = (not_before or _now()) - CLOCK_SKEW
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + CLOCK_SKEW + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH]
                    + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Credentials(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_pem_key(key),
            ca_pem=self.cert_pem,
        )
