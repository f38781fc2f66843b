"""Two checkouts of bigpool side by side, in fresh pools that alternate round by round.

    python benchmarks/compare.py OLD_TREE NEW_TREE [--workload apply|map] [--rounds 10] [--n N]

Each round starts a fresh ``BigPool(processes=2, system="local")`` from each tree in turn (the
order alternates between rounds), warms it up, and then runs one workload:

* ``apply`` (default): ``--n`` (4,000) sequential ``apply(noop, (i,))`` after 200 warm-up
  ones; the figures are the p50 latency and the CPU time per call.
* ``map``: ``map(noop, range(--n), chunksize=1)`` (20,000) after a 2,000-task warm-up map;
  the figures are tasks/s and the CPU time per task.

CPU time is that of the driver and all its child processes, and is also shown split into the
driver, the machine processes and the worker processes. A tree is a directory holding the
``bigpool`` package (a git worktree, say: ``git worktree add /tmp/old HEAD~1``); each round runs
in it, with it first on ``PYTHONPATH``, which the machines and workers inherit. The table shows the median over the
rounds and every round's main figure.

Why alternate fresh pools: on a shared virtual machine the speed of the host moves by a fifth
or more from one minute (and one pool instance, whose processes land on other CPUs) to the
next, more than most changes this is used to judge; side by side rounds see the same host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time
import psutil
sys.path.insert(0, sys.argv[3])
from bigpool import BigPool
from pool import noop

workload, n = sys.argv[1], int(sys.argv[2])


def cpu(procs):
    split = {"driver": 0.0, "machines": 0.0, "workers": 0.0}
    for proc in procs:
        if proc.pid == psutil.Process().pid:
            kind = "driver"
        elif "bigpool._worker_main" in " ".join(proc.cmdline()):
            kind = "workers"
        else:
            kind = "machines"
        split[kind] += sum(proc.cpu_times()[:4])
    return split


with BigPool(processes=2, system="local") as p:
    if workload == "apply":
        for i in range(200):
            p.apply(noop, (i,))
    else:
        p.map(noop, range(2000), chunksize=1)
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    before = cpu(procs)
    started = time.perf_counter()
    if workload == "apply":
        samples = []
        for i in range(n):
            t = time.perf_counter()
            if p.apply(noop, (i,)) != i:
                raise AssertionError("apply(noop) returned a wrong result")
            samples.append(time.perf_counter() - t)
        samples.sort()
        figure = samples[n // 2] * 1e6
    else:
        if p.map(noop, range(n), chunksize=1) != list(range(n)):
            raise AssertionError("map(noop) returned a wrong result")
        figure = n / (time.perf_counter() - started)
    after = cpu(procs)
spent = {kind: (after[kind] - before[kind]) / n * 1e6 for kind in after}
print(figure, sum(spent.values()), spent["driver"], spent["machines"], spent["workers"])
"""

FIGURE = {"apply": "p50 µs", "map": "tasks/s"}


def one_round(tree: str, workload: str, n: int) -> list[float]:
    """The workload's figure, then CPU µs per task: all, driver, machines, workers."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, here]))
    # In the tree's directory: a machine or worker process (``python -m ...``) puts its working
    # directory first on its path, so from anywhere else it could import another checkout.
    out = subprocess.run([sys.executable, "-c", CHILD, workload, str(n), tree], env=env,
                         cwd=tree, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the pool from {tree} failed:\n{out.stderr}")
    return [float(x) for x in out.stdout.split()[-5:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs=2, help="two directories that hold a bigpool package")
    parser.add_argument("--workload", choices=sorted(FIGURE), default="apply")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--n", type=int, default=None,
                        help="applies (default 4,000) or map tasks (default 20,000)")
    args = parser.parse_args(argv)
    for tree in args.trees:
        if not os.path.isfile(os.path.join(tree, "bigpool", "__init__.py")):
            parser.error(f"{tree} holds no bigpool package")
    n = args.n if args.n is not None else 4000 if args.workload == "apply" else 20000
    if args.rounds < 1 or n < 1:
        parser.error("--rounds and --n must be at least 1")
    figures: dict[str, list[list[float]]] = {tree: [] for tree in args.trees}
    for r in range(args.rounds):
        for tree in args.trees if r % 2 == 0 else args.trees[::-1]:
            figures[tree].append(one_round(tree, args.workload, n))
    what = "applies" if args.workload == "apply" else "map tasks (chunksize=1)"
    print(f"{args.rounds} rounds of {n:,} {what} per tree, alternating; medians over the rounds")
    print(f"| tree | {FIGURE[args.workload]} | CPU µs per task: all | driver | machines | "
          f"workers | {FIGURE[args.workload]} per round |")
    print("|---|---|---|---|---|---|---|")
    for tree, rows in figures.items():
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(f"| {tree} | {medians[0]:,.0f} | "
              + " | ".join(f"{m:.1f}" for m in medians[1:])
              + f" | {', '.join(f'{row[0]:,.0f}' for row in rows)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
