"""What one party of the cluster holds for mutual TLS, and the TLS contexts made from it.

Kept apart from :mod:`.authority` (which needs ``cryptography`` to make keys) so that a
machine, which only uses credentials it was given, starts without loading it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass

__all__ = ["TLS12_CIPHERS", "Credentials"]

# Suites for TLS 1.2 (1.3 suites are all AEAD and fixed by OpenSSL).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class Credentials:
    """What one party needs for mutual TLS: its leaf certificate and key, and the CA certificate.

    All three are PEM bytes. This is everything a machine receives; it holds no CA key.
    """

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:
        return "Credentials(<leaf certificate>, <private key hidden>, <CA certificate>)"

    def _load_into(self, ctx: ssl.SSLContext) -> None:
        # ssl can only load a certificate chain from files; keep them private and brief.
        with tempfile.TemporaryDirectory(prefix="bigpool-tls-") as tmp:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            for path, data in ((cert_path, self.cert_pem), (key_path, self.key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ctx.load_cert_chain(cert_path, key_path)
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.SSLContext(
            ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
        )
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHERS)
        ctx.set_alpn_protocols(["h2"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.options |= ssl.OP_NO_COMPRESSION
        self._load_into(ctx)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """A TLS context for serving: it demands a client certificate signed by the CA."""
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        """A TLS context for calling: it presents our leaf and verifies the server's.

        The server's certificate must be signed by the CA and name the host dialled (an IP or
        DNS subject alternative name).
        """
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = True
        return ctx
