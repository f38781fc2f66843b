"""debug_demo: a pool kept busy, to look at through the debug endpoint.

Runs two kinds of CPU-bound task (a Monte Carlo estimate and a sort) on a pool of machines for
``--seconds``, with the debug endpoint on (``127.0.0.1:3333`` unless ``--bigpool-debug`` says
otherwise). While it runs:

    python -m bigpool status http://127.0.0.1:3333
    python -m bigpool profile http://127.0.0.1:3333 --seconds 5 -o cpu.svg
    go tool pprof -top http://127.0.0.1:3333/debug/bigmachine/pprof/profile?seconds=5
    open http://127.0.0.1:3333/debug/bigmachine/status in a browser

    python examples/debug_demo.py --seconds 120 --processes 2
"""

from __future__ import annotations

import argparse
import random
import time

import bigpool
from bigpool import expvar_add


def monte_carlo(n: int) -> float:
    """π from ``n`` random points (CPU-bound, pure Python)."""
    rnd = random.Random(n).random
    inside = sum(1 for _ in range(n) if rnd() ** 2 + rnd() ** 2 < 1.0)
    return 4 * inside / n


def sort_words(n: int) -> int:
    """Sort ``n`` random strings (CPU-bound, mostly in C: shows as one frame)."""
    rnd = random.Random(n)
    words = ["".join(rnd.choice("abcdefgh") for _ in range(8)) for _ in range(n)]
    return len(sorted(words))


def task(i: int) -> float:
    # Published in the worker process; /debug/vars shows the sum per machine. (Imported by
    # name: this function travels by value, and so would a module it names.)
    expvar_add("demo_tasks_run")
    return monte_carlo(200_000) if i % 3 else float(sort_words(20_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bigpool.add_arguments(parser)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to keep busy")
    parser.add_argument("--processes", type=int, default=2, help="worker slots in all")
    args = parser.parse_args()
    debug = args.bigpool_debug or "127.0.0.1:3333"
    system = args.bigpool_system or "local"
    with bigpool.BigPool(args.processes, system=system, debug=debug) as pool:
        print(f"debug endpoint: {pool.b.debug_url}/debug/bigmachine/status", flush=True)
        deadline = time.monotonic() + args.seconds
        i = 0
        while time.monotonic() < deadline:
            for _ in pool.imap_unordered(task, range(i, i + 4 * args.processes)):
                bigpool.expvar_add("demo_tasks_done")
            i += 4 * args.processes
            bigpool.expvar_set("demo_batches", i // (4 * args.processes))
        print(f"ran {i} tasks", flush=True)


if __name__ == "__main__":
    main()
