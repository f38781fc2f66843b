"""BigPool next to multiprocessing.Pool: the same six workloads on both, in the same run.

    python benchmarks/pool.py                  # the full run: median of 3 runs
    python benchmarks/pool.py --runs 5
    python benchmarks/pool.py --quick          # a smoke run: 1 run, small sizes
    python benchmarks/pool.py --only 2,5 --pool bigpool --runs 1   # e.g. under py-spy

Both pools get 2 worker processes: ``BigPool(processes=2, system="local")`` and
``multiprocessing.Pool(2)`` (this platform's default start method). Each run makes one pool of
each kind and puts it through the workloads in order (the two kinds alternate which goes first
from run to run):

1. start-up to first result: construct the pool and get ``apply(noop)``, in seconds;
2. ``map(noop, range(20_000), chunksize=1)``, in tasks/s;
3. ``map(noop, range(200_000))`` with the pool's default chunksize, in tasks/s;
4. ``apply(noop)`` round trip: 1,000 sequential calls after 50 warm-up ones, p50 and p99 in µs;
5. 64 tasks of 8 MiB: each receives an 8 MiB ``bytes`` and returns it (8 MiB back),
   ``map(..., chunksize=1)``, in MiB/s of payload moved in both directions (64 x 16 MiB);
6. Monte Carlo π from 2e8 samples in 16 tasks (a pure-Python loop over ``random.Random``),
   ``map(..., chunksize=1)``, as the speed-up over the same sampling done serially in this
   process. The serial time is measured just before and just after each pool's parallel run
   (their mean, so the host's drift over the run counts the same on both sides), each on a
   tenth of the samples scaled up tenfold (the loop costs the same per sample;
   ``--serial-full`` times all of them instead).

Workloads 2, 3 and 5 start with a small warm-up ``map`` of the same function. Each figure is the
median over ``--runs`` runs; the ratio is taken between the two medians and oriented so that
> 1.0 always means bigpool is better (for throughputs and speed-ups bigpool ÷ multiprocessing,
for times multiprocessing ÷ bigpool). The last columns give the target and whether bigpool met
it. Every pool is closed (or terminated, on error or Ctrl-C) before the next is made, and a
workload that takes longer than ``--timeout`` seconds is abandoned.

The task functions live at module level here: ``multiprocessing`` pickles them by reference,
and bigpool's local machines, which run with the driver's ``sys.path``, receive functions from
``__main__`` by value (dill).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import platform
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bigpool import BigPool

MiB = 1 << 20
PROCESSES = 2

# --- the task functions (module level, so both pools can ship them) --------------------------


def noop(x: Any = None) -> Any:
    return x


def echo_bytes(data: bytes) -> bytes:
    """Receive a payload and send it back whole: its size travels each way."""
    return data


def pi_sample(n: int) -> int:
    """Draw ``n`` points of the unit square; how many fall inside the unit circle."""
    rnd = random.Random().random  # seeded from os.urandom: tasks do not share a stream
    inside = 0
    for _ in itertools.repeat(None, n):
        x = rnd()
        y = rnd()
        if x * x + y * y < 1.0:
            inside += 1
    return inside


def _ignore_sigint() -> None:
    # multiprocessing's forked workers share our process group: let the parent handle Ctrl-C
    # (and terminate them) instead of each worker printing a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- sizes, targets, results -----------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    map1_tasks: int  # workload 2
    map_default_tasks: int  # workload 3
    applies: int  # workload 4
    applies_warmup: int
    big_tasks: int  # workload 5
    big_bytes: int
    pi_samples: int  # workload 6
    pi_tasks: int
    serial_fraction: float  # share of pi_samples timed serially (then scaled up)


FULL = Sizes(20_000, 200_000, 1_000, 50, 64, 8 * MiB, 200_000_000, 16, 0.1)
QUICK = Sizes(2_000, 20_000, 200, 20, 8, 8 * MiB, 20_000_000, 16, 0.1)


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str
    higher_is_better: bool  # of the raw figure
    target: str  # as printed
    met: Callable[[float, float, float], bool]  # (bigpool, multiprocessing, ratio) -> met


WORKLOADS = [
    Workload("1", "start-up to first apply() result", "s", False, "bigpool <= 0.5 s",
             lambda bp, mp, ratio: bp <= 0.5),
    Workload("2", "map no-op, chunksize=1", "tasks/s", True, "ratio >= 1.0",
             lambda bp, mp, ratio: ratio >= 1.0),
    Workload("3", "map no-op, default chunksize", "tasks/s", True, "ratio >= 0.5",
             lambda bp, mp, ratio: ratio >= 0.5),
    Workload("4", "apply no-op round trip p50 / p99", "µs", False, "bp p50 <= 2x mp",
             lambda bp, mp, ratio: bp <= 2 * mp),
    Workload("5", "8 MiB argument + 8 MiB result", "MiB/s", True, "ratio >= 1.0",
             lambda bp, mp, ratio: ratio >= 1.0),
    Workload("6", "Monte Carlo pi, speed-up vs serial", "x", True, "bigpool >= 1.9x",
             lambda bp, mp, ratio: bp >= 1.9),
]
KEYS = [w.key for w in WORKLOADS]


def labels(sizes: Sizes) -> dict[str, str]:
    return {
        "1": "1 start-up to first apply() result",
        "2": f"2 map no-op x{sizes.map1_tasks:,}, chunksize=1",
        "3": f"3 map no-op x{sizes.map_default_tasks:,}, default chunksize",
        "4": f"4 apply no-op round trip x{sizes.applies:,}, p50 / p99",
        "5": f"5 {sizes.big_tasks} x {sizes.big_bytes // MiB} MiB each way",
        "6": f"6 pi, {sizes.pi_samples:.0e} samples in {sizes.pi_tasks} tasks, speed-up",
    }


class WorkloadTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise WorkloadTimeout in the main thread if the block runs longer than ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise WorkloadTimeout(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- the workloads ---------------------------------------------------------------------------


def throughput(pool: Any, tasks: int, chunksize: int | None) -> float:
    warm = min(tasks, 200)
    if chunksize is None:
        pool.map(noop, range(warm))
    else:
        pool.map(noop, range(warm), chunksize=chunksize)
    started = time.perf_counter()
    if chunksize is None:
        got = pool.map(noop, range(tasks))
    else:
        got = pool.map(noop, range(tasks), chunksize=chunksize)
    elapsed = time.perf_counter() - started
    if got != list(range(tasks)):
        raise AssertionError("map(noop) returned wrong results")
    return tasks / elapsed


def apply_latency(pool: Any, sizes: Sizes) -> tuple[float, float]:
    for _ in range(sizes.applies_warmup):
        pool.apply(noop, (None,))
    samples = []
    clock = time.perf_counter
    for i in range(sizes.applies):
        started = clock()
        got = pool.apply(noop, (i,))
        samples.append(clock() - started)
        if got != i:
            raise AssertionError("apply(noop) returned a wrong result")
    return percentile(samples, 0.5) * 1e6, percentile(samples, 0.99) * 1e6


def big_payloads(pool: Any, sizes: Sizes) -> float:
    payload = os.urandom(sizes.big_bytes)
    pool.map(echo_bytes, [payload] * 2, chunksize=1)  # warm-up
    started = time.perf_counter()
    got = pool.map(echo_bytes, [payload] * sizes.big_tasks, chunksize=1)
    elapsed = time.perf_counter() - started
    if len(got) != sizes.big_tasks or any(g != payload for g in got):
        raise AssertionError("echo_bytes returned wrong results")
    return 2 * sizes.big_tasks * sizes.big_bytes / MiB / elapsed


def pi_parallel(pool: Any, sizes: Sizes) -> float:
    """Seconds for the pool to draw all the samples."""
    share, extra = divmod(sizes.pi_samples, sizes.pi_tasks)
    shares = [share + (1 if i < extra else 0) for i in range(sizes.pi_tasks)]
    started = time.perf_counter()
    inside = sum(pool.map(pi_sample, shares, chunksize=1))
    elapsed = time.perf_counter() - started
    estimate = 4 * inside / sizes.pi_samples
    if abs(estimate - 3.14159) > 0.01:
        raise AssertionError(f"pi came out as {estimate}")
    return elapsed


def pi_serial(sizes: Sizes, full: bool) -> float:
    """Seconds for this process to draw all the samples (timed on a fraction unless ``full``)."""
    n = sizes.pi_samples if full else round(sizes.pi_samples * sizes.serial_fraction)
    started = time.perf_counter()
    pi_sample(n)
    return (time.perf_counter() - started) * sizes.pi_samples / n


def pi_speedup(pool: Any, sizes: Sizes, full: bool) -> tuple[float, float]:
    """(speed-up, serial seconds): the serial time is the mean of one taken just before and
    one just after the pool's run, which sees the same state of the host."""
    before = pi_serial(sizes, full)
    parallel = pi_parallel(pool, sizes)
    serial = (before + pi_serial(sizes, full)) / 2
    return serial / parallel, serial


def make_mp() -> Any:
    return multiprocessing.Pool(PROCESSES, initializer=_ignore_sigint)


def make_bigpool() -> Any:
    return BigPool(processes=PROCESSES, system="local")


def run_pool(
    kind: str, factory: Callable[[], Any], sizes: Sizes, only: set[str], serial_full: bool,
    timeout: float,
) -> dict[str, Any]:
    """One pool of one kind through the workloads; key -> figure, or an Exception."""
    results: dict[str, Any] = {}
    pool = None
    clean = False
    try:
        with deadline(timeout):
            started = time.perf_counter()
            pool = factory()
            pool.apply(noop, (None,))
            results["1"] = time.perf_counter() - started
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("2", lambda: throughput(pool, sizes.map1_tasks, 1)),
            ("3", lambda: throughput(pool, sizes.map_default_tasks, None)),
            ("4", lambda: apply_latency(pool, sizes)),
            ("5", lambda: big_payloads(pool, sizes)),
            ("6", lambda: pi_speedup(pool, sizes, serial_full)),
        ]
        for key, step in steps:
            if key not in only:
                continue
            try:
                with deadline(timeout):
                    results[key] = step()
                if key == "6":
                    results["6"], results["serial pi s"] = results["6"]
            except (Exception, WorkloadTimeout) as exc:
                results[key] = exc
                print(f"  {kind}: workload {key} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
                if isinstance(exc, WorkloadTimeout):
                    break  # the pool may be wedged: the rest of this run is not measured
        with deadline(timeout):
            pool.close()
            pool.join()
        clean = True
    except (Exception, WorkloadTimeout) as exc:
        results.setdefault("1", exc)
        print(f"  {kind}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if pool is not None and not clean:
            pool.terminate()
    return results


# --- the table -------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], key: str) -> Any:
    """The median figure (p50 and p99 taken separately), or the first error if no run had one."""
    got = [r[key] for r in runs if key in r and not isinstance(r[key], BaseException)]
    if not got:
        errors = [r[key] for r in runs if key in r]
        return errors[0] if errors else None
    if isinstance(got[0], tuple):
        return tuple(statistics.median(g[i] for g in got) for i in range(len(got[0])))
    return statistics.median(got)


def fmt(value: Any, unit: str) -> str:
    if value is None:
        return "not run"
    if isinstance(value, BaseException):
        return f"error: {type(value).__name__}"
    if isinstance(value, tuple):
        return " / ".join(fmt(v, unit) for v in value)
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "µs":
        return f"{value:,.0f} µs"
    if unit == "MiB/s":
        return f"{value:,.0f} MiB/s"
    return f"{value:,.0f}/s"


def raw(value: Any) -> str:
    if isinstance(value, BaseException):
        return type(value).__name__
    if isinstance(value, tuple):
        return "/".join(raw(v) for v in value)
    return f"{value:.4g}"


def table(
    bp_runs: list[dict[str, Any]], mp_runs: list[dict[str, Any]], sizes: Sizes, only: set[str]
) -> tuple[list[str], int]:
    """The table's lines, and how many targets were missed."""
    names = labels(sizes)
    header = ("workload", "multiprocessing", "bigpool", "ratio (>1: bp better)", "target", "met")
    rows = []
    missed = 0
    for w in WORKLOADS:
        if w.key not in only:
            continue
        mp, bp = median_of(mp_runs, w.key), median_of(bp_runs, w.key)
        mp1 = mp[0] if isinstance(mp, tuple) else mp
        bp1 = bp[0] if isinstance(bp, tuple) else bp
        if isinstance(mp1, float) and isinstance(bp1, float) and mp1 > 0 and bp1 > 0:
            ratio = bp1 / mp1 if w.higher_is_better else mp1 / bp1
            ok = w.met(bp1, mp1, ratio)
            missed += not ok
            ratio_s, met_s = f"{ratio:.2f}", ("met" if ok else "MISSED")
        elif isinstance(bp1, BaseException):
            missed += 1
            ratio_s, met_s = "-", "MISSED (error)"
        else:
            ratio_s, met_s = "-", "-"
        rows.append((names[w.key], fmt(mp, w.unit), fmt(bp, w.unit), ratio_s, w.target, met_s))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(header)) + " |",
        "|" + "|".join("-" * (wd + 2) for wd in widths) + "|",
    ]
    for r in rows:
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, missed


def machine_line() -> str:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip() + ", "
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {model}{os.cpu_count()} cores ({usable} usable), "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.platform()}, multiprocessing start method "
        f"{multiprocessing.get_start_method()}; {bytecode_state()}"
    )


def bytecode_state() -> str:
    """Whether bigpool's machines and workers load it from cached bytecode or compile it at
    start (no cache is written under ``PYTHONDONTWRITEBYTECODE``): ~0.15 s of start-up here."""
    import importlib.util

    import bigpool.pool

    source = bigpool.pool.__file__ or ""
    cached = os.path.exists(importlib.util.cache_from_source(source))
    return f"bigpool bytecode {'cached' if cached else 'not cached (compiled in every process)'}"


def cpu_idle(seconds: float) -> float | None:
    """The share of this host's CPU time that was idle over the next ``seconds`` (Linux)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float) -> float | None:
    """Wait (up to ``limit`` s) for 3 s in a row with >= 90% idle CPU; the last idle share."""
    deadline_at = time.monotonic() + limit
    quiet = 0
    idle = cpu_idle(1.0)
    while idle is not None and time.monotonic() < deadline_at:
        quiet = quiet + 1 if idle >= 0.9 else 0
        if quiet >= 3:
            break
        idle = cpu_idle(1.0)
    return idle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=None, help="runs to take the median of (3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 run, a tenth of the tasks, 2e7 pi samples")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. 2,5")
    parser.add_argument("--pool", choices=["both", "bigpool", "multiprocessing"], default="both")
    parser.add_argument("--serial-full", action="store_true",
                        help="time the serial pi run on all samples instead of a tenth")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a workload may take before it is abandoned (300)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the host's CPUs to go idle")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    only = set(args.only.split(",")) if args.only else set(KEYS)
    if only - set(KEYS) or runs < 1:
        parser.error(f"--only takes workloads among {','.join(KEYS)}; --runs must be >= 1")
    only.add("1")  # every pool is started, so its start-up is always measured

    kinds: list[tuple[str, Callable[[], Any]]] = []
    if args.pool in ("both", "multiprocessing"):
        kinds.append(("multiprocessing", make_mp))
    if args.pool in ("both", "bigpool"):
        kinds.append(("bigpool", make_bigpool))

    print(machine_line(), flush=True)
    idle = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else cpu_idle(1.0)
    if idle is not None:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"host before the run: {idle:.0%} of CPU time idle over 1 s, load average {load}"
              + ("  (other work is running: figures will be noisy)" if idle < 0.9 else ""),
              flush=True)
    serial_how = ("all samples" if args.serial_full else
                  f"{sizes.serial_fraction:g} of the samples, scaled up")
    print(f"command: {' '.join(['python', *sys.argv])}; {runs} run(s), median shown; "
          f"serial pi timed on {serial_how}", flush=True)
    all_runs: dict[str, list[dict[str, Any]]] = {"bigpool": [], "multiprocessing": []}
    try:
        for i in range(runs):
            t0 = time.perf_counter()
            # alternate the order so that neither kind always runs on a warmer machine
            for kind, factory in kinds if i % 2 == 0 else kinds[::-1]:
                all_runs[kind].append(run_pool(kind, factory, sizes, only, args.serial_full,
                                               args.timeout))
            summary = "; ".join(
                f"{kind}: " + ", ".join(f"{k}={raw(v)}" for k, v in sorted(r[-1].items()))
                for kind, r in all_runs.items() if r
            )
            print(f"run {i + 1}/{runs} in {time.perf_counter() - t0:.1f} s; {summary}",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average after the run: {load}")
    lines, missed = table(all_runs["bigpool"], all_runs["multiprocessing"], sizes, only)
    print("ratio = bigpool / multiprocessing for throughputs and speed-ups, "
          "multiprocessing / bigpool for times: > 1.0 means bigpool is better")
    print("\n".join(lines))
    errors = any(isinstance(v, BaseException) for r in all_runs.values() for d in r
                 for v in d.values())
    if all_runs["bigpool"]:
        print(f"targets missed: {missed}" if missed else "all targets met")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
