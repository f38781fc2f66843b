"""What the debug endpoint costs: page latency, profile latency, and the slow-down of a busy
pool while it is profiled.

    python benchmarks/debug.py                 # 2 local machines, 3 rounds of 300 tasks
    python benchmarks/debug.py --machines 2 --runs 5 --tasks 400

Prints one table:

* ``status page``: p50/p99 of ``GET /debug/bigmachine/status?format=json`` on an idle pool
  (gathers memory, disk and load from every machine);
* ``profile 1 s``: wall time of ``GET .../pprof/profile?seconds=1`` (py-spy start-up,
  sampling, merge, encoding), median;
* ``throughput``: tasks/s of ``map`` over ``--tasks`` CPU-bound tasks (pure-Python Monte
  Carlo, 100,000 points each), without and with a profile of the whole cluster running all along,
  medians over ``--runs`` alternating rounds, and the slow-down between them.

On a host with fewer cores than machines + 1, py-spy's own CPU time (one sampler per process,
100 samples/s each) competes with the workers, which the slow-down includes.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import threading
import time
import urllib.request

import bigpool


def work(n: int) -> int:
    rnd = random.Random(n).random
    return sum(1 for _ in range(100_000) if rnd() ** 2 + rnd() ** 2 < 1.0)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=300) as response:
        data: bytes = response.read()
        return data


def tasks_per_second(pool: bigpool.BigPool, tasks: int) -> float:
    started = time.perf_counter()
    pool.map(work, range(tasks), chunksize=1)
    return tasks / (time.perf_counter() - started)


def profiled_tasks_per_second(pool: bigpool.BigPool, tasks: int, url: str, seconds: int) -> float:
    profiler = threading.Thread(
        target=get, args=(f"{url}/debug/bigmachine/pprof/profile?seconds={seconds}",), daemon=True
    )
    profiler.start()
    time.sleep(0.5)  # measure while py-spy samples, not while it starts
    rate = tasks_per_second(pool, tasks)
    profiler.join()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description="the debug endpoint's costs")
    parser.add_argument("--machines", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=300, help="tasks per timed map")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with bigpool.BigPool(args.machines, system="local", debug="127.0.0.1:0") as pool:
        url = pool.b.debug_url
        pool.map(work, range(args.machines * 2))  # warm up: machines and workers running
        latencies = []
        for _ in range(50):
            started = time.perf_counter()
            get(f"{url}/debug/bigmachine/status?format=json")
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        rows.append(("status page (json), p50 / p99",
                     f"{latencies[len(latencies) // 2] * 1e3:.1f} ms / "
                     f"{latencies[int(len(latencies) * 0.99) - 1] * 1e3:.1f} ms"))
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            get(f"{url}/debug/bigmachine/pprof/profile?seconds=1")
            walls.append(time.perf_counter() - started)
        rows.append(("profile 1 s of an idle pool, wall time (median)",
                     f"{statistics.median(walls):.2f} s"))
        plain, profiled = [], []
        for _ in range(args.runs):
            plain.append(tasks_per_second(pool, args.tasks))
            # Sample for longer than the map takes, so all of it runs under the profiler.
            seconds = math.ceil(1.5 * args.tasks / plain[-1]) + 1
            profiled.append(profiled_tasks_per_second(pool, args.tasks, url, seconds))
        base, during = statistics.median(plain), statistics.median(profiled)
        rows.append((f"throughput, {args.machines} machines, no profile", f"{base:.1f} tasks/s"))
        rows.append(("throughput while the cluster is profiled", f"{during:.1f} tasks/s"))
        rows.append(("slow-down while profiled", f"{100 * (1 - during / base):.1f}%"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
