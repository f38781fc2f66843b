"""BigPool ``apply`` round trips of two checkouts of bigpool, in alternating pools.

    python benchmarks/compare_apply.py OLD_TREE NEW_TREE [--rounds 10] [--applies 4000]

Each round starts a fresh ``BigPool(processes=2, system="local")`` from each tree in turn (the
order alternates between rounds), makes 200 warm-up calls and then ``--applies`` sequential
``apply(noop, (i,))``, and records the p50 latency and the CPU time of the driver and all of its
child processes per call. A tree is a directory holding the ``bigpool`` package (a git worktree,
say: ``git worktree add /tmp/old HEAD~1``); it goes first on ``PYTHONPATH``, which the machines
and workers inherit. The table shows the median over the rounds and every round's figure.

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
sys.path.insert(0, sys.argv[2])
from bigpool import BigPool
from pool import noop

n = int(sys.argv[1])
with BigPool(processes=2, system="local") as p:
    for i in range(200):
        p.apply(noop, (i,))
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]

    def cpu() -> float:
        return sum(sum(proc.cpu_times()[:4]) for proc in procs)

    before = cpu()
    samples = []
    for i in range(n):
        started = time.perf_counter()
        if p.apply(noop, (i,)) != i:
            raise AssertionError("apply(noop) returned a wrong result")
        samples.append(time.perf_counter() - started)
    spent = cpu() - before
samples.sort()
print(samples[n // 2] * 1e6, spent / n * 1e6)
"""


def one_round(tree: str, applies: int) -> tuple[float, float]:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, here]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(applies), tree], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the pool from {tree} failed:\n{out.stderr}")
    p50, cpu = out.stdout.split()[-2:]
    return float(p50), float(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs=2, help="two directories that hold a bigpool package")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--applies", type=int, default=4000)
    args = parser.parse_args(argv)
    for tree in args.trees:
        if not os.path.isfile(os.path.join(tree, "bigpool", "__init__.py")):
            parser.error(f"{tree} holds no bigpool package")
    if args.rounds < 1 or args.applies < 1:
        parser.error("--rounds and --applies must be at least 1")
    figures: dict[str, list[tuple[float, float]]] = {tree: [] for tree in args.trees}
    for r in range(args.rounds):
        for tree in args.trees if r % 2 == 0 else args.trees[::-1]:
            figures[tree].append(one_round(tree, args.applies))
    print(f"{args.rounds} rounds of {args.applies:,} applies per tree, alternating")
    print("| tree | p50 µs (median) | CPU µs per apply, all processes (median) | p50 per round |")
    print("|---|---|---|---|")
    for tree, rows in figures.items():
        p50s = [p for p, _ in rows]
        cpus = [c for _, c in rows]
        print(f"| {tree} | {statistics.median(p50s):.0f} | {statistics.median(cpus):.0f} | "
              f"{', '.join(f'{p:.0f}' for p in p50s)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
