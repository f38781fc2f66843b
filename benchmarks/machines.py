"""Machine start-up and call round trips on the local system, next to multiprocessing.Pool.

    python benchmarks/machines.py              # 3 start-ups of 4 machines, 2000 calls
    python benchmarks/machines.py --runs 5 --calls 5000 --machines 4

Prints one table:

* ``bigpool: start N machines -> all RUNNING``: seconds from ``b.start(N, ...)`` to every
  machine RUNNING (process spawn, Python start-up, TLS, and the boot sequence: info, setargs,
  keepalive, register), median over ``--runs`` fresh clusters;
* ``bigpool: Machine.call round trip``: p50/p99 of sequential no-op calls to one machine
  (and the same through ``call_async`` from an asyncio loop of the caller's own);
* ``multiprocessing.Pool(N)``: start-up to the first result of a trivial ``map``, and a
  ``pool.apply`` round trip, as reference lines.

The target is N=4 machines RUNNING in at most 1 s (median); the last line says met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import bigpool

TARGET_START_SECONDS = 1.0


class Noop:
    """A service that does nothing, so that a call measures the machinery alone."""

    def noop(self, arg: object) -> object:
        return arg


def _square(x: int) -> int:
    return x * x


def _noop(x: object = None) -> object:
    return x


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def time_calls(call: Callable[[], object], count: int, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def bigpool_start(machines: int, system: str) -> tuple[float, float]:
    """(seconds for bigpool.start, seconds from b.start to all RUNNING) for one fresh cluster."""
    started = time.perf_counter()
    with bigpool.start(system) as b:
        driver = time.perf_counter() - started
        started = time.perf_counter()
        ms = b.start(machines, services={"Noop": Noop()})
        for m in ms:
            m.wait(bigpool.State.RUNNING, timeout=120)
            if m.err() is not None:
                raise SystemExit(f"machine {m.addr} failed: {m.err()}")
        return driver, time.perf_counter() - started


def bigpool_calls(count: int, system: str) -> tuple[list[float], list[float]]:
    """Round trips of sequential no-op calls: through ``call`` and through ``call_async``."""
    with bigpool.start(system) as b:
        (m,) = b.start(1, services={"Noop": Noop()})
        m.wait(bigpool.State.RUNNING, timeout=120)
        if m.err() is not None:
            raise SystemExit(f"machine {m.addr} failed: {m.err()}")
        sync = time_calls(lambda: m.call("Noop.noop", None, timeout=30), count)

        async def async_calls() -> list[float]:
            times = []
            for i in range(count + 50):
                started = time.perf_counter()
                await m.call_async("Noop.noop", None, timeout=30)
                if i >= 50:  # warm-up
                    times.append(time.perf_counter() - started)
            return times

        return sync, asyncio.run(async_calls())


def pool_start(processes: int) -> float:
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        pool.map(_square, range(processes))
        elapsed = time.perf_counter() - started
    return elapsed


def pool_calls(count: int) -> list[float]:
    with multiprocessing.Pool(1) as pool:
        return time_calls(lambda: pool.apply(_noop, (None,)), count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="start-ups to take the median of")
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls to time")
    parser.add_argument("--machines", type=int, default=4, help="machines (and pool processes)")
    parser.add_argument("--system", default="local", help="bigpool system (default local)")
    args = parser.parse_args(argv)
    n = args.machines

    driver_times, start_times, pool_times = [], [], []
    for _ in range(args.runs):
        driver, boot = bigpool_start(n, args.system)
        driver_times.append(driver)
        start_times.append(boot)
        pool_times.append(pool_start(n))
    calls, async_calls = bigpool_calls(args.calls, args.system)
    applies = pool_calls(args.calls)

    def secs(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"

    def micros(values: list[float]) -> str:
        return f"p50 {percentile(values, 50) * 1e6:.0f} µs, p99 {percentile(values, 99) * 1e6:.0f} µs"

    rows = [
        (f"bigpool.start({args.system!r}) (authority, driver loop)", secs(driver_times)),
        (f"bigpool: b.start({n}) -> all RUNNING, median of {args.runs}", secs(start_times)),
        (f"bigpool: Machine.call no-op round trip x{args.calls}", micros(calls)),
        (f"bigpool: Machine.call_async (own loop) round trip x{args.calls}", micros(async_calls)),
        (f"multiprocessing.Pool({n}) start -> first map result, median of {args.runs}",
         secs(pool_times)),
        (f"multiprocessing pool.apply no-op round trip x{args.calls}", micros(applies)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"python {sys.version.split()[0]}, start method {multiprocessing.get_start_method()}, "
          f"{multiprocessing.cpu_count()} cpus")
    print(f"{'measurement'.ljust(width)} | result")
    print(f"{'-' * width}-+-{'-' * 40}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    median = statistics.median(start_times)
    verdict = "met" if median <= TARGET_START_SECONDS else "MISSED"
    print(f"target: {n} machines RUNNING in <= {TARGET_START_SECONDS:g} s (median): {verdict} "
          f"({median:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
