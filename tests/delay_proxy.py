"""A TCP forwarder that delays one direction: a slow host's egress, when netem is missing.

``python delay_proxy.py LISTEN_HOST PORT TARGET_HOST TARGET_PORT SECONDS`` accepts on
LISTEN_HOST:PORT and forwards each connection to TARGET_HOST:TARGET_PORT. Once it gets
SIGUSR1, what the target sends back is held SECONDS before it is passed on (in order); what
the caller sends always goes at once. Like ``tc netem delay`` on the target host's interface, it adds latency without taking
bandwidth (TCP's own acknowledgements are not delayed, which netem would do). Prints
``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

DELAY = [0.0]


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
    loop = asyncio.get_running_loop()
    pending = 0
    eof = asyncio.Event()

    def deliver(data: bytes) -> None:
        nonlocal pending
        pending -= 1
        if not writer.is_closing():
            writer.write(data)
        if pending == 0 and eof.is_set() and not writer.is_closing():
            writer.close()

    try:
        while data := await reader.read(65536):
            if delayed and (DELAY[0] or pending):
                pending += 1
                loop.call_later(DELAY[0], deliver, data)
            else:
                writer.write(data)
                await writer.drain()
    except OSError:
        pass
    eof.set()
    if pending == 0:
        writer.close()


async def main(listen_host: str, port: int, target_host: str, target_port: int,
               delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            writer.close()
            return
        with contextlib.suppress(Exception):
            await asyncio.gather(_pump(reader, up_writer, False), _pump(up_reader, writer, True))

    asyncio.get_running_loop().add_signal_handler(
        signal.SIGUSR1, lambda: DELAY.__setitem__(0, delay))
    server = await asyncio.start_server(handle, listen_host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    host, port, target, target_port, seconds = sys.argv[1:6]
    asyncio.run(main(host, int(port), target, int(target_port), float(seconds)))
