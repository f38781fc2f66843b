"""Throughput of the machine side of BigPool: tiny no-op chunks through one machine.

Submits ``--chunks`` one-task chunks of a no-op function (in batches of ``--batch``) to one
machine serving ``PoolWorkerService(--processes)`` and reads the results stream until every
record has arrived; prints records/s. Everything it starts is stopped on the way out.

    python benchmarks/pool_worker.py [--system local|test] [--chunks N] [--batch N] [--processes N]
"""

from __future__ import annotations

import argparse
import pickle
import struct
import threading
import time

import dill

import bigpool
from bigpool.worker import SERVICE_NAME, Chunk, PoolWorkerService


def noop(x: object) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="local")
    parser.add_argument("--chunks", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=1)
    opts = parser.parse_args()
    b = bigpool.start(opts.system)
    try:
        (m,) = b.start(1, services={SERVICE_NAME: PoolWorkerService(opts.processes)})
        m.wait(bigpool.State.RUNNING, timeout=60)
        if m.err() is not None:
            raise SystemExit(f"machine failed: {m.err()}")
        func, args = dill.dumps(noop), pickle.dumps([(0,)])
        reader = m.call(f"{SERVICE_NAME}.results")
        n, got, done = opts.chunks, 0, threading.Event()

        def read() -> None:
            nonlocal got
            buffer = b""
            while got < n:
                buffer += reader.read_chunk()
                while len(buffer) >= 4:
                    (size,) = struct.unpack(">I", buffer[:4])
                    if len(buffer) < 4 + size:
                        break
                    pickle.loads(buffer[4 : 4 + size])
                    buffer = buffer[4 + size :]
                    got += 1
            done.set()

        threading.Thread(target=read, daemon=True).start()
        started = time.perf_counter()
        for first in range(0, n, opts.batch):
            batch = [Chunk(i, b"noop", func if i == 0 else None, args, False)
                     for i in range(first, min(n, first + opts.batch))]
            m.call(f"{SERVICE_NAME}.submit", batch)
        done.wait()
        elapsed = time.perf_counter() - started
        print(f"{opts.system}: {n} records in {elapsed:.2f}s = {n / elapsed:.0f} records/s "
              f"({opts.processes} worker(s))")
        reader.close()
    finally:
        b.shutdown()


if __name__ == "__main__":
    main()
