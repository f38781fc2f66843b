"""Run by test_rpc_memory.py in a subprocess: stream 1 GiB over TLS, report peak RSS.

``python memory_probe.py arg`` streams 1 GiB as an argument (the server counts it);
``python memory_probe.py reply`` streams 1 GiB as a reply (the client counts it). Both ends
run in this process, so its peak RSS covers them both. Prints one JSON line: the bytes
and CRC-32 received, the CRC-32 expected, and the peak RSS in bytes.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import zlib
from collections.abc import Iterator

from bigpool.h2rpc import Authority, Client, Server, StreamReader

MiB = 1024 * 1024
TOTAL = 1024 * MiB
BLOCK = bytes(range(256)) * (MiB // 256)  # one object, sent 1024 times


def _peak_rss_kib() -> int:
    """This process's peak RSS in KiB. On Linux, VmHWM: ``ru_maxrss`` there also counts the
    parent's RSS when it started us (exec folds the old memory map's high-water mark in), so a
    big test runner would fail the bound for memory this process never used."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def blocks() -> Iterator[bytes]:
    for _ in range(TOTAL // MiB):
        yield BLOCK


class Sink:
    async def consume(self, reader: StreamReader) -> tuple[int, int]:
        n = crc = 0
        async for chunk in reader:
            n += len(chunk)
            crc = zlib.crc32(chunk, crc)
        return n, crc

    def produce(self, _: object = None) -> Iterator[bytes]:
        return blocks()


async def main(direction: str) -> None:
    authority = Authority.create()
    server = Server(authority.issue("s", ips=["127.0.0.1"]).server_context())
    server.register("Sink", Sink())
    client = Client(authority.issue("c").client_context())
    try:
        host, port = await server.start("127.0.0.1", 0)
        addr = f"{host}:{port}"
        if direction == "arg":
            received, crc = await client.call(addr, "Sink.consume", blocks(), timeout=120)
        else:
            reader = await client.call(addr, "Sink.produce", timeout=120)
            received = crc = 0
            async with reader:
                async for chunk in reader:
                    received += len(chunk)
                    crc = zlib.crc32(chunk, crc)
    finally:
        await client.close()
        await server.close()
    expected = 0
    for block in blocks():
        expected = zlib.crc32(block, expected)
    maxrss_kib = _peak_rss_kib()
    print(json.dumps(
        {"bytes": received, "crc": crc, "expected_crc": expected, "maxrss": maxrss_kib * 1024}
    ))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
