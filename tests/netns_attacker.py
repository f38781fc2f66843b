"""A hostile peer for test_reliability_hostile.py, run inside another host's namespace.

``python netns_attacker.py HOST PORT SECONDS CERTDIR MARKER CONCURRENCY`` attacks the machine
at HOST:PORT for SECONDS with CONCURRENCY connections at once, each of one kind (all of them, or those
named, comma-separated, in ``$ATTACK_KINDS``):

* unauthenticated: TLS with no certificate, with one from another CA, with an expired one
  from the right CA, HTTP/1.1 over TLS, plain TCP garbage, cleartext HTTP/2, and idle TCP
  connections that never say anything;
* authenticated (a valid certificate from CERTDIR): a header block that never ends, a body
  that never ends, and a body declared far larger than what is sent.

Every request carries a pickle that would create the directory MARKER if unpickled. Prints
one JSON line: per kind, how many attempts were made, how many the server closed on its own
("closed"), and how many were still open when this side gave up ("held").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import pickle
import random
import ssl
import sys
from typing import Any

import hpack
from hostile_helpers import (
    CONTINUATION,
    DATA,
    HEADERS,
    PREFACE,
    SETTINGS_FRAME,
    frame,
    h2_client,
)

from bigpool.h2rpc import wire

# Longer than the server's TLS handshake timeout (10 s): an idle stranger must be dropped.
IDLE_PATIENCE = 13.0


class Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def _request(poison: bytes, path: bytes = b"/bigrpc/Probe.echo") -> bytes:
    conn = h2_client()
    conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"),
                          (b":authority", b"x"), (b":path", path),
                          (b"content-type", wire.CONTENT_TYPE_VALUE)])
    conn.send_data(1, poison, end_stream=True)
    return bytes(conn.data_to_send())


def _headers_block(path: bytes, content_type: bytes, extra: bytes = b"") -> bytes:
    return hpack.Encoder().encode([(b":method", b"POST"), (b":scheme", b"https"),
                                   (b":authority", b"x"), (b":path", path),
                                   (b"content-type", content_type)]) + extra


class Attack:
    def __init__(self, host: str, port: int, certdir: str, marker: str) -> None:
        self.host = host
        self.port = port
        self.poison = pickle.dumps(Marker(marker))
        with open(os.path.join(certdir, "ca.pem")) as f:
            ca = f.read()
        self.contexts: dict[str, ssl.SSLContext] = {}
        for name, cert in (("no_cert", None), ("other_ca", "other"), ("expired", "expired"),
                           ("http1", None), ("valid", "valid")):
            ctx = ssl.create_default_context(cadata=ca)
            ctx.check_hostname = False
            if cert is not None:
                ctx.load_cert_chain(os.path.join(certdir, f"{cert}.pem"),
                                    os.path.join(certdir, f"{cert}.key"))
            ctx.set_alpn_protocols(["http/1.1"] if name == "http1" else ["h2"])
            self.contexts[name] = ctx
        self.tried: collections.Counter[str] = collections.Counter()
        self.closed: collections.Counter[str] = collections.Counter()
        self.held: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(1)

    def payloads(self, kind: str) -> tuple[ssl.SSLContext | None, list[bytes], float]:
        """What a kind sends: TLS context (or None), the pieces (sent 50 ms apart), and how
        long it waits for the server to close before it counts as held."""
        request = _request(self.poison)
        if kind in ("no_cert", "other_ca", "expired"):
            return self.contexts[kind], [request], 5.0
        if kind == "http1":
            body = self.poison
            return self.contexts[kind], [
                b"POST /bigrpc/Probe.echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                % len(body) + body], 5.0
        if kind == "plain_tcp":  # may look like the start of a TLS record: waits as idle does
            return None, [self.rng.randbytes(self.rng.randrange(1, 5000))], IDLE_PATIENCE
        if kind == "cleartext_h2":
            return None, [request], 5.0
        if kind == "idle":
            return None, [], IDLE_PATIENCE
        start = PREFACE + SETTINGS_FRAME
        if kind == "endless_headers":
            block = _headers_block(b"/bigrpc/Probe.echo", wire.CONTENT_TYPE_VALUE)
            pieces = [start + frame(HEADERS, 0, 1, block)]
            pieces += [frame(CONTINUATION, 0, 1, b"\x00" * 16000)] * 200
            return self.contexts["valid"], pieces, 5.0
        if kind == "endless_body":
            block = _headers_block(b"/bigrpc/Probe.echo", wire.CONTENT_TYPE_VALUE)
            pieces = [start + frame(HEADERS, 0x4, 1, block)]
            pieces += [frame(DATA, 0, 1, self.poison + b"\x00" * 16000)] * 200
            return self.contexts["valid"], pieces, 3.0
        if kind == "declared_larger":
            block = _headers_block(b"/bigrpc/Probe.echo", wire.CONTENT_TYPE_VALUE,
                                   hpack.Encoder().encode([(b"content-length", b"1000000000")]))
            return self.contexts["valid"], [start + frame(HEADERS, 0x4, 1, block),
                                            frame(DATA, 0, 1, self.poison)], 3.0
        raise ValueError(kind)

    async def one(self, kind: str) -> None:
        ctx, pieces, patience = self.payloads(kind)
        self.tried[kind] += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=ctx,
                                        server_hostname=self.host if ctx else None), 5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            self.closed[kind] += 1  # refused during the handshake
            return

        async def send() -> None:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)

        async def read_to_end() -> None:
            while await reader.read(65536):
                pass

        sender = asyncio.ensure_future(send())
        try:
            await asyncio.wait_for(read_to_end(), patience)
            self.closed[kind] += 1
        except asyncio.TimeoutError:
            self.held[kind] += 1
        except (OSError, ssl.SSLError, EOFError):
            self.closed[kind] += 1
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            writer.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def run(self, seconds: float, concurrency: int) -> None:
        kinds = ["no_cert", "other_ca", "expired", "http1", "plain_tcp", "cleartext_h2",
                 "idle", "endless_headers", "endless_body", "declared_larger"]
        if os.environ.get("ATTACK_KINDS"):
            kinds = os.environ["ATTACK_KINDS"].split(",")
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def worker(i: int) -> None:
            n = i
            while loop.time() < end:
                await self.one(kinds[n % len(kinds)])
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


def main() -> None:
    host, port, seconds, certdir, marker, concurrency = sys.argv[1:7]
    attack = Attack(host, int(port), certdir, marker)
    asyncio.run(attack.run(float(seconds), int(concurrency)))
    print(json.dumps({"tried": attack.tried, "closed": attack.closed, "held": attack.held}),
          flush=True)


if __name__ == "__main__":
    main()
