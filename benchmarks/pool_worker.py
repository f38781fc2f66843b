"""Throughput of the machine side of BigPool: tiny no-op chunks through one machine.

Submits ``--chunks`` one-task chunks of a no-op function (in batches of ``--batch``) to one
machine serving ``PoolWorkerService(--processes)`` and reads the results stream until every
record has arrived; prints records/s. Everything it starts is stopped on the way out.

    python benchmarks/pool_worker.py [--system local|test] [--chunks N] [--batch N] [--processes N]
"""

from __future__ import annotations

import argparse
import pickle
import threading
import time

import dill

import bigpool
from bigpool.pool_wire import ResultDecoder
from bigpool.worker import OK, SERVICE_NAME, Chunk, PoolWorkerService


def noop(x: object) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="local")
    parser.add_argument("--chunks", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up after this many seconds")
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
            decoder = ResultDecoder()
            try:
                while got < n:
                    data = reader.read_chunk()
                    if not data:
                        return  # the stream ended early: main() reports the shortfall
                    for result in decoder.feed(data):
                        if result.status != OK:
                            raise SystemExit(f"chunk {result.chunk_id} failed: status "
                                             f"{result.status}")
                        pickle.loads(result.payload)
                        got += 1
            finally:
                done.set()

        threading.Thread(target=read, daemon=True).start()
        started = time.perf_counter()
        for first in range(0, n, opts.batch):
            batch = [Chunk(i, b"noop", func if i == 0 else None, args, False)
                     for i in range(first, min(n, first + opts.batch))]
            m.call(f"{SERVICE_NAME}.submit", batch)
        if not done.wait(opts.timeout) or got < n:
            raise SystemExit(f"only {got} of {n} records arrived")
        elapsed = time.perf_counter() - started
        print(f"{opts.system}: {n} records in {elapsed:.2f}s = {n / elapsed:.0f} records/s "
              f"({opts.processes} worker(s))")
        reader.close()
    finally:
        b.shutdown()


if __name__ == "__main__":
    main()
