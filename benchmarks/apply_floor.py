"""How low can an apply() round trip go when it crosses a TLS connection? A floor, measured.

    python benchmarks/apply_floor.py            # 5,000 round trips per row
    python benchmarks/apply_floor.py --n 20000

BigPool's ``apply`` travels driver -> machine (mutual TLS over TCP) -> worker process (a
pipe) and back. This script times the bare bones of that path with nothing of bigpool's in
it: blocking sockets and pipes, 100-byte messages, no HTTP/2, no asyncio, no pickling, no
threads. Each row adds one piece:

1. ``multiprocessing.Pool(2).apply(noop)``, the reference;
2. a TCP echo over loopback between two processes;
3. the same with the driver -> machine hop under TLS (bigpool's own certificates);
4. TLS plus a pipe hop to a third process (the worker) and back, bigpool's shape;
5. ``BigPool(processes=2, system="local").apply(noop)`` itself.

Row 4 is a lower bound for any apply over mutual TLS with a separate worker process, written
in Python: compare it with twice row 1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Callable

from bigpool import BigPool
from bigpool.h2rpc import Authority

MESSAGE = b"x" * 100


def noop(x: object = None) -> object:
    return x


def _p50_us(call: Callable[[], object], n: int) -> float:
    for _ in range(min(500, n // 10)):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _serve(listener: socket.socket, tls: bool, worker_hop: bool, authority: Authority) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        server = authority.issue("machine", ips=["127.0.0.1"]).server_context()
        conn = server.wrap_socket(conn, server_side=True)
    if worker_hop:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        if os.fork() == 0:
            os.close(to_worker_w)  # else this worker would never see its input end
            os.close(from_worker_r)
            while data := os.read(to_worker_r, 65536):
                os.write(from_worker_w, data)
            os._exit(0)
        os.close(to_worker_r)
        os.close(from_worker_w)
    while data := conn.recv(65536):
        if worker_hop:
            os.write(to_worker_w, data)
            data = os.read(from_worker_r, 65536)
        conn.sendall(data)
    os._exit(0)


def echo_p50(tls: bool, worker_hop: bool, n: int) -> float:
    authority = Authority.create()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        try:
            _serve(listener, tls, worker_hop, authority)
        finally:
            os._exit(1)
    listener.close()
    conn = socket.create_connection(("127.0.0.1", port))
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            client = authority.issue("driver").client_context()
            conn = client.wrap_socket(conn, server_hostname="127.0.0.1")

        def round_trip() -> None:
            conn.sendall(MESSAGE)
            received = 0
            while received < len(MESSAGE):
                received += len(conn.recv(65536))

        return _p50_us(round_trip, n)
    finally:
        conn.close()
        os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="round trips per row")
    args = parser.parse_args()
    rows: list[tuple[str, float]] = []
    with multiprocessing.Pool(2) as pool:
        rows.append(("multiprocessing.Pool(2).apply(noop)",
                     _p50_us(lambda: pool.apply(noop), args.n)))
    rows.append(("TCP echo, 2 processes", echo_p50(False, False, args.n)))
    rows.append(("mutual TLS echo, 2 processes", echo_p50(True, False, args.n)))
    rows.append(("mutual TLS + pipe to a 3rd process (floor)", echo_p50(True, True, args.n)))
    with BigPool(processes=2, system="local") as bp:
        rows.append(("BigPool(processes=2).apply(noop)", _p50_us(lambda: bp.apply(noop), args.n)))
    reference = rows[0][1]
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.n:,} round trips per row")
    print("| path | p50 | x multiprocessing |")
    print("|---|---|---|")
    for name, p50 in rows:
        print(f"| {name} | {p50:,.0f} µs | {p50 / reference:.1f} |")
    print(f"target for BigPool: p50 <= 2 x multiprocessing = {2 * reference:,.0f} µs")


if __name__ == "__main__":
    main()
