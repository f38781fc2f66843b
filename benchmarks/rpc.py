"""The RPC benchmark: bigpool's HTTP/2 + mutual TLS RPC on loopback, next to a Pipe.

The server runs in a separate process (``multiprocessing`` spawn; it receives its TLS
credentials from this process, which holds the authority) and the client here, both on
127.0.0.1 over mutual TLS. It measures:

* sequential round trips (p50/p99, microseconds) of a small argument to an ``async def`` echo,
  to a plain-def echo (run in the server's thread pool), and through ``LoopThread.run`` from
  this (the main) thread;
* calls/s with 1, 16 and 128 calls in flight on one connection;
* MB/s (10^6 bytes/s) of a streamed 1 GiB argument and of a streamed 1 GiB reply;
* a ``multiprocessing`` Pipe round trip and Pipe throughput, as the reference lines.

Each figure is the median of ``--runs`` runs (3 by default). ``--quick`` is a smoke run of a
few seconds (one run, fewer calls, 64 MiB streams). Every process it starts is stopped on the
way out, also on error or Ctrl-C.

    python benchmarks/rpc.py [--quick] [--runs N] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from bigpool.h2rpc import Authority, Client, Credentials, LoopThread, Server, StreamReader

GiB = 1 << 30
CHUNK = 1 << 20
SMALL = b"x" * 32  # the "small argument"

# (target, higher is better)
TARGET_P50_US = 250.0
TARGET_CALLS = 8000.0
TARGET_MBS = 500.0


# --- the server process ---------------------------------------------------------------------


class Bench:
    """The service the benchmark calls."""

    def __init__(self) -> None:
        self._block = bytes(CHUNK)

    async def echo(self, x: Any) -> Any:
        return x

    def echo_thread(self, x: Any) -> Any:
        return x

    async def sink(self, reader: StreamReader) -> int:
        n = 0
        async for chunk in reader:
            n += len(chunk)
        return n

    async def source(self, size: int) -> AsyncIterator[bytes]:
        return _produce(self._block, size)


async def _produce(block: bytes, size: int) -> AsyncIterator[bytes]:
    """``size`` bytes in chunks of ``block`` (a generator of bytes, like a file read in chunks)."""
    sent = 0
    while sent < size:
        n = min(len(block), size - sent)
        yield block if n == len(block) else block[:n]
        sent += n


def _server_main(creds: Credentials, control: multiprocessing.connection.Connection) -> None:
    """The server process: serve until the parent says stop (or goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us

    async def serve() -> None:
        server = Server(creds.server_context())
        server.register("Bench", Bench())
        host, port = await server.start("127.0.0.1", 0)
        control.send((host, port, os.getpid()))
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def on_control() -> None:
            # "cpu" asks for our CPU time so far; anything else, or EOF (the parent died), stops.
            try:
                message = control.recv()
            except (EOFError, OSError):
                message = None
            if message == "cpu":
                control.send(time.process_time())
            elif not stop.done():
                stop.set_result(None)

        loop.add_reader(control.fileno(), on_control)
        try:
            await stop
        finally:
            loop.remove_reader(control.fileno())
            await server.close()

    asyncio.run(serve())


def _pipe_echo_main(conn: multiprocessing.connection.Connection) -> None:
    """The Pipe reference peer: echo objects; count byte messages until an empty one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg == "stop":
            return
        if msg == "bytes":
            total = 0
            while chunk := conn.recv_bytes():
                total += len(chunk)
            conn.send(total)
        else:
            conn.send(msg)


# --- measurement helpers --------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def latency_us(samples_ns: list[int]) -> tuple[float, float]:
    us = [s / 1000 for s in samples_ns]
    return percentile(us, 0.5), percentile(us, 0.99)


@dataclass
class Sizes:
    calls: int  # sequential calls per latency run
    warmup: int
    window: float  # seconds per throughput run
    stream: int  # bytes per streamed transfer


FULL = Sizes(calls=5000, warmup=500, window=2.0, stream=GiB)
QUICK = Sizes(calls=500, warmup=100, window=0.4, stream=64 << 20)


async def seq_latency(client: Client, addr: str, method: str, sizes: Sizes) -> tuple[float, float]:
    for _ in range(sizes.warmup):
        await client.call(addr, method, SMALL)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(sizes.calls):
        t0 = clock()
        await client.call(addr, method, SMALL)
        samples.append(clock() - t0)
    return latency_us(samples)


def sync_latency(lt: LoopThread, client: Client, addr: str, sizes: Sizes) -> tuple[float, float]:
    for _ in range(sizes.warmup):
        lt.run(client.call(addr, "Bench.echo", SMALL))
    samples = []
    clock = time.perf_counter_ns
    for _ in range(sizes.calls):
        t0 = clock()
        lt.run(client.call(addr, "Bench.echo", SMALL))
        samples.append(clock() - t0)
    return latency_us(samples)


async def calls_per_second(
    client: Client, addr: str, in_flight: int, sizes: Sizes
) -> tuple[float, int]:
    """Calls/s over a window (after a warm-up), and the number of calls made in all."""
    done = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal done
        loop = asyncio.get_running_loop()
        while loop.time() < stop_at:
            await client.call(addr, "Bench.echo", SMALL)
            done += 1

    loop = asyncio.get_running_loop()
    # warm up (connection, caches), then measure a window
    stop_at = loop.time() + min(0.3, sizes.window / 2)
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    warm = done
    done = 0
    t0 = time.perf_counter()
    stop_at = loop.time() + sizes.window
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done / (time.perf_counter() - t0), warm + done


async def stream_upload(client: Client, addr: str, sizes: Sizes) -> float:
    t0 = time.perf_counter()
    n = await client.call(addr, "Bench.sink", _produce(bytes(CHUNK), sizes.stream))
    elapsed = time.perf_counter() - t0
    assert n == sizes.stream, (n, sizes.stream)
    return sizes.stream / elapsed / 1e6


async def stream_download(client: Client, addr: str, sizes: Sizes) -> float:
    t0 = time.perf_counter()
    reader = await client.call(addr, "Bench.source", sizes.stream)
    n = 0
    async for chunk in reader:
        n += len(chunk)
    elapsed = time.perf_counter() - t0
    assert n == sizes.stream, (n, sizes.stream)
    return sizes.stream / elapsed / 1e6


def pipe_latency(conn: multiprocessing.connection.Connection, sizes: Sizes) -> tuple[float, float]:
    for _ in range(sizes.warmup):
        conn.send(SMALL)
        conn.recv()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(sizes.calls):
        t0 = clock()
        conn.send(SMALL)
        conn.recv()
        samples.append(clock() - t0)
    return latency_us(samples)


def pipe_throughput(conn: multiprocessing.connection.Connection, sizes: Sizes) -> float:
    block = memoryview(bytes(CHUNK))
    t0 = time.perf_counter()
    conn.send("bytes")
    sent = 0
    while sent < sizes.stream:
        n = min(CHUNK, sizes.stream - sent)
        conn.send_bytes(block[:n])
        sent += n
    conn.send_bytes(b"")
    total = conn.recv()
    elapsed = time.perf_counter() - t0
    assert total == sizes.stream
    return sizes.stream / elapsed / 1e6


# --- the run --------------------------------------------------------------------------------

# name -> (label, unit, target, higher_is_better)
ROWS: dict[str, tuple[str, str, float | None, bool]] = {
    "seq_async": ("round trip, async def echo", "us", TARGET_P50_US, False),
    "seq_thread": ("round trip, plain def echo (thread pool)", "us", TARGET_P50_US, False),
    "seq_sync": ("round trip, LoopThread.run from main thread", "us", TARGET_P50_US, False),
    "calls_1": ("calls/s, 1 in flight", "calls/s", None, True),
    "calls_16": ("calls/s, 16 in flight", "calls/s", None, True),
    "calls_128": ("calls/s, 128 in flight", "calls/s", TARGET_CALLS, True),
    "upload": ("streamed 1 GiB argument", "MB/s", TARGET_MBS, True),
    "download": ("streamed 1 GiB reply", "MB/s", TARGET_MBS, True),
    "pipe_rt": ("reference: multiprocessing Pipe round trip", "us", None, False),
    "pipe_bw": ("reference: multiprocessing Pipe throughput", "MB/s", None, True),
}
LATENCY_ROWS = {"seq_async", "seq_thread", "seq_sync", "pipe_rt"}


class CpuMeter:
    """CPU time (user + system) of this process and of the server, per call, in microseconds.

    Unlike wall-clock figures it hardly moves when other work shares the machine, so it is
    the figure to compare changes by.
    """

    def __init__(self, control: multiprocessing.connection.Connection) -> None:
        self._control = control

    def _now(self) -> tuple[float, float]:
        self._control.send("cpu")
        return time.process_time(), self._control.recv()

    def measure(self, calls: int | Callable[[Any], int], run: Callable[[], Any]) -> tuple[Any, tuple[float, float]]:
        c0, s0 = self._now()
        result = run()
        c1, s1 = self._now()
        n = calls(result) if callable(calls) else calls
        n = max(n, 1)
        return result, ((c1 - c0) / n * 1e6, (s1 - s0) / n * 1e6)


def run_once(
    sizes: Sizes, only: set[str], addr: str, client_creds: Credentials,
    pipe: multiprocessing.connection.Connection, cpu: CpuMeter,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    lt = LoopThread("bench-client")
    seq_calls = sizes.calls + sizes.warmup
    try:
        client = Client(client_creds.client_context())
        try:
            def on_loop(coro: Any) -> Any:
                return lt.run(coro)

            lt.run(client.call(addr, "Bench.echo", SMALL))  # connect outside the measurements
            for name, method in (("seq_async", "Bench.echo"), ("seq_thread", "Bench.echo_thread")):
                if name in only:
                    results[name], results[f"cpu_{name}"] = cpu.measure(
                        seq_calls,
                        lambda m=method: on_loop(seq_latency(client, addr, m, sizes)),  # type: ignore[misc]
                    )
            if "seq_sync" in only:
                results["seq_sync"], results["cpu_seq_sync"] = cpu.measure(
                    seq_calls, lambda: sync_latency(lt, client, addr, sizes)
                )
            for n in (1, 16, 128):
                if f"calls_{n}" in only:
                    (rate, _), results[f"cpu_calls_{n}"] = cpu.measure(
                        lambda r: r[1],
                        lambda n=n: on_loop(calls_per_second(client, addr, n, sizes)),  # type: ignore[misc]
                    )
                    results[f"calls_{n}"] = rate
            mib = max(1, sizes.stream >> 20)  # stream rows: CPU per MiB moved
            if "upload" in only:
                results["upload"], results["cpu_upload"] = cpu.measure(
                    mib, lambda: on_loop(stream_upload(client, addr, sizes))
                )
            if "download" in only:
                results["download"], results["cpu_download"] = cpu.measure(
                    mib, lambda: on_loop(stream_download(client, addr, sizes))
                )
        finally:
            lt.run(client.close(), timeout=10)
    finally:
        lt.close()
    if "pipe_rt" in only:
        results["pipe_rt"] = pipe_latency(pipe, sizes)
    if "pipe_bw" in only:
        results["pipe_bw"] = pipe_throughput(pipe, sizes)
    return results


def _fmt(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:,.0f}"
    return f"{value:,.0f}"


def print_table(runs: list[dict[str, Any]], sizes: Sizes) -> bool:
    stream_label = f"{sizes.stream / GiB:g} GiB" if sizes.stream >= GiB else f"{sizes.stream >> 20} MiB"
    print()
    print(f"{'':46} {'p50/value':>10} {'p99':>7}  {'unit':8} {'target':>9}  {'met':3}  "
          f"{'CPU us/call (/MiB) c+s':>25}")
    all_met = True
    for name, (label, unit, target, higher) in ROWS.items():
        got = [r[name] for r in runs if name in r]
        if not got:
            continue
        label = label.replace("1 GiB", stream_label)
        if name in LATENCY_ROWS:
            p50 = statistics.median(g[0] for g in got)
            p99 = statistics.median(g[1] for g in got)
            value, extra = p50, f"{p99:>7,.0f}"
        else:
            value, extra = statistics.median(got), f"{'':>7}"
        if target is None:
            tgt, met = "", ""
        else:
            ok = value >= target if higher else value <= target
            all_met &= ok
            tgt = f"{'>=' if higher else '<='} {target:,.0f}"
            met = "yes" if ok else "NO"
        cpus = [r[f"cpu_{name}"] for r in runs if f"cpu_{name}" in r]
        cpu = ""
        if cpus:
            client = statistics.median(c[0] for c in cpus)
            server = statistics.median(c[1] for c in cpus)
            cpu = f"{client:.0f} + {server:.0f} = {client + server:.0f}"
        print(f"{label:46} {value:>10,.0f} {extra}  {unit:8} {tgt:>9}  {met:3}  {cpu:>25}")
    return all_met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (median); 3, or 1 with --quick")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(ROWS)}")
    parser.add_argument("--stream-mib", type=int, default=None, help="size of the streamed transfers")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.stream_mib:
        sizes = Sizes(sizes.calls, sizes.warmup, sizes.window, args.stream_mib << 20)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    only = set(args.only.split(",")) if args.only else set(ROWS)
    unknown = only - set(ROWS)
    if unknown:
        parser.error(f"unknown --only names: {', '.join(sorted(unknown))}")

    ctx = multiprocessing.get_context("spawn")
    ca = Authority.create()
    server_creds = ca.issue("bench-server", ips=["127.0.0.1"])
    client_creds = ca.issue("bench-client")

    print(
        f"bigpool RPC benchmark: Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {runs} run(s) per figure, median shown; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    procs: list[multiprocessing.process.BaseProcess] = []
    controls: list[multiprocessing.connection.Connection] = []
    try:
        parent_ctl, child_ctl = ctx.Pipe()
        controls.append(parent_ctl)
        server = ctx.Process(target=_server_main, args=(server_creds, child_ctl), daemon=True)
        server.start()
        procs.append(server)
        child_ctl.close()
        if not parent_ctl.poll(30):
            raise RuntimeError("the server process did not start within 30s")
        host, port, server_pid = parent_ctl.recv()
        addr = f"{host}:{port}"

        pipe_parent, pipe_child = ctx.Pipe()
        controls.append(pipe_parent)
        echo = ctx.Process(target=_pipe_echo_main, args=(pipe_child,), daemon=True)
        echo.start()
        procs.append(echo)
        pipe_child.close()
        print(f"server pid {server_pid} at {addr}; client pid {os.getpid()}", file=sys.stderr)

        cpu = CpuMeter(parent_ctl)
        results = []
        for i in range(runs):
            t0 = time.perf_counter()
            results.append(run_once(sizes, only, addr, client_creds, pipe_parent, cpu))
            print(f"run {i + 1}/{runs} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        met = print_table(results, sizes)
        print()
        print("all targets met" if met else "some targets NOT met")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _stop(procs, controls)


def _stop(
    procs: list[multiprocessing.process.BaseProcess],
    controls: list[multiprocessing.connection.Connection],
) -> None:
    for conn in controls:
        with contextlib.suppress(OSError, ValueError):
            conn.send("stop")
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in controls:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
