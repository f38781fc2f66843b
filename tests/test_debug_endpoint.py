"""The debug endpoint against real clusters: a pool of 2 local machines whose workers burn CPU,
profiled, dumped and shown over HTTP; a machine killed in the middle of a profile; the CLI.

The busy function runs until a gate file appears, so no assertion depends on timing: each
profile is taken while both workers are known (by their marker files) to be spinning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from debug_tasks import Publisher, burn_until
from pool_support import wait_until
from pprof_reader import Pprof, read

import bigpool
from bigpool.debug import cli

SVG = "{http://www.w3.org/2000/svg}"


def get(url: str, timeout: float = 60) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers.items())


@dataclass
class Burning:
    pool: bigpool.BigPool
    url: str
    addrs: list[str]
    gate: Path


@pytest.fixture(scope="module")
def burning(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Burning]:
    """A 2-machine local pool with a debug endpoint, both workers spinning in burn_until."""
    tmp = tmp_path_factory.mktemp("burn")
    gate, markers = tmp / "gate", tmp / "markers"
    markers.mkdir()
    pool = bigpool.BigPool(2, system="local", debug="127.0.0.1:0",
                           services={"Pub": Publisher()})
    try:
        result = pool.starmap_async(burn_until, [(str(gate), str(markers))] * 2, chunksize=1)
        wait_until(lambda: len(os.listdir(markers)) == 2, 60, "both workers to start burning")
        url = pool.b.debug_url
        assert url is not None
        yield Burning(pool, url, sorted(m.addr for m in pool.machines), gate)
        gate.touch()
        assert all(n > 0 for n in result.get(timeout=60))
    finally:
        gate.touch()
        pool.terminate()


@pytest.fixture(scope="module")
def merged(burning: Burning) -> tuple[bytes, Pprof]:
    status, body, headers = get(f"{burning.url}/debug/bigmachine/pprof/profile?seconds=1")
    assert status == 200, body
    assert headers["Content-Type"] == "application/octet-stream"
    return body, read(body)


def samples_by_machine(profile: Pprof, function: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in profile.samples:
        if function in sample.functions:
            machine = sample.labels["machine"]
            counts[machine] = counts.get(machine, 0) + sample.values[0]
    return counts


def test_merged_profile_holds_the_busy_frame_from_both_machines(
    burning: Burning, merged: tuple[bytes, Pprof]
) -> None:
    _, profile = merged
    counts = samples_by_machine(profile, "burn_until")
    assert sorted(counts) == burning.addrs, counts
    assert all(n > 0 for n in counts.values())
    roles = {s.labels["role"] for s in profile.samples if "burn_until" in s.functions}
    assert roles == {"worker"}
    assert profile.sample_types == [("samples", "count"), ("cpu", "nanoseconds")]


def test_go_tool_pprof_reads_the_merged_profile(merged: tuple[bytes, Pprof],
                                                tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (apt-get install golang-go; .ci/run does so where apt "
                    "works)")
    path = tmp_path / "cpu.pb.gz"
    path.write_bytes(merged[0])
    env = dict(os.environ, HOME=str(tmp_path), GOPATH=str(tmp_path / "go"),
               GOCACHE=str(tmp_path / "cache"), GOFLAGS="-mod=mod", PPROF_TMPDIR=str(tmp_path))
    proc = subprocess.run([go, "tool", "pprof", "-top", str(path)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "burn_until" in proc.stdout, proc.stdout
    assert "Type: cpu" in proc.stdout


def test_flamegraph_is_svg_naming_the_function(burning: Burning) -> None:
    status, body, headers = get(f"{burning.url}/debug/bigmachine/pprof/flamegraph?seconds=1")
    assert status == 200, body
    assert headers["Content-Type"] == "image/svg+xml"
    root = ET.fromstring(body)
    titles = [t.text or "" for t in root.iter(f"{SVG}title")]
    assert any(t.startswith("burn_until (debug_tasks.py)") for t in titles), titles[:20]


def test_collapsed_by_machine_and_one_machine_alone(burning: Burning) -> None:
    first = burning.addrs[0]
    status, body, _ = get(f"{burning.url}/debug/bigmachine/pprof/flamegraph?seconds=1"
                          f"&format=collapsed&by=machine&machine={first}")
    assert status == 200, body
    lines = [line for line in body.decode().splitlines() if not line.startswith("#")]
    assert lines and all(line.startswith(f"machine {first};") for line in lines), lines[:5]
    assert any("burn_until" in line for line in lines)


def test_status_page_and_json_name_both_machines(burning: Burning) -> None:
    status, body, _ = get(f"{burning.url}/debug/bigmachine/status")
    assert status == 200
    html = body.decode()
    for addr in burning.addrs:
        assert addr in html
    status, body, _ = get(f"{burning.url}/debug/bigmachine/status?format=json")
    data = json.loads(body)
    machines = {m["addr"]: m for m in data["machines"]}
    assert sorted(machines) == burning.addrs
    for m in machines.values():
        assert m["state"] == "RUNNING"
        assert m["mem"]["total"] > 0 and m["load"]["cpus"] >= 1 and m["keepalive_reply_ms"]
        assert "info_errors" not in m
    assert data["pool"]["tasks"]["running"] == 2
    assert data["pool"]["tasks"]["done"] == 0


def test_expvars_from_both_machines(burning: Burning) -> None:
    bigpool.expvar_add("driver_test_counter", 3)
    status, body, _ = get(f"{burning.url}/debug/vars")
    assert status == 200
    data = json.loads(body)
    assert data["driver_test_counter"] >= 3 and data["pid"] == os.getpid()
    machines = data["machines"]
    assert sorted(machines) == burning.addrs
    pids = {addr: machines[addr]["publisher_pid"] for addr in burning.addrs}
    assert pids == {m.addr: m.pid for m in burning.pool.machines}
    assert all(machines[a]["publisher_inits"] == 1 for a in burning.addrs)
    for addr in burning.addrs:  # the pool's worker service reports itself
        workers = machines[addr]["BigPoolWorker"]
        assert workers["running"] == 1 and len(workers["worker_pids"]) == 1, workers


def test_threads_dump_shows_every_process(burning: Burning) -> None:
    status, body, _ = get(f"{burning.url}/debug/bigmachine/pprof/threads")
    assert status == 200
    text = body.decode()
    assert "=== driver ===" in text
    for m in burning.pool.machines:
        assert f"=== {m.addr} ===" in text and f"process {m.pid} (machine)" in text
    assert text.count("burn_until") >= 2, text[:3000]


def test_index_and_heap_without_tracemalloc(burning: Burning) -> None:
    status, body, _ = get(f"{burning.url}/debug/bigmachine/pprof/")
    assert status == 200
    for name in ("profile?seconds=30", "flamegraph?seconds=10", "threads", *burning.addrs):
        assert name in body.decode()
    status, body, _ = get(f"{burning.url}/debug/bigmachine/pprof/heap")
    assert status == 404 and b"PYTHONTRACEMALLOC=1" in body


@pytest.mark.parametrize(("path", "code", "message"), [
    ("/debug/bigmachine/pprof/profile?seconds=abc", 400, "seconds must be a whole number"),
    ("/debug/bigmachine/pprof/profile?seconds=0", 400, "from 1 to 600"),
    ("/debug/bigmachine/pprof/flamegraph?seconds=601", 400, "from 1 to 600"),
    ("/debug/bigmachine/pprof/profile?seconds=1&format=xml", 400, "format must be one of"),
    ("/debug/bigmachine/pprof/profile?seconds=1&machine=https://10.0.0.1:1/", 404,
     "no machine 'https://10.0.0.1:1/' in this cluster; known: driver, https://127.0.0.1:"),
    ("/debug/bigmachine/pprof/nope", 404, "unknown profile 'nope'"),
    ("/debug/bigmachine/status?format=yaml", 400, "format must be one of html, json, text"),
    ("/elsewhere", 404, "no page '/elsewhere'"),
])
def test_bad_requests_are_named(burning: Burning, path: str, code: int, message: str) -> None:
    started = time.monotonic()
    status, body, _ = get(burning.url + path)
    assert status == code, body
    assert message in body.decode()
    assert time.monotonic() - started < 5, "a bad request should not take a profile"


def test_cli_profile_writes_svg_and_pprof(burning: Burning, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    svg, pb = tmp_path / "cpu.svg", tmp_path / "cpu.pb.gz"
    assert cli.profile([burning.url, "--seconds", "1", "-o", str(svg)]) == 0
    assert cli.profile([burning.url.removeprefix("http://"), "--seconds", "1",
                        "--machine", burning.addrs[1], "-o", str(pb)]) == 0
    titles = [t.text or "" for t in ET.fromstring(svg.read_bytes()).iter(f"{SVG}title")]
    assert any("burn_until" in t for t in titles)
    assert sorted(samples_by_machine(read(pb.read_bytes()), "burn_until")) == [burning.addrs[1]]
    assert cli.profile([burning.url, "--seconds", "1", "-o", str(tmp_path / "x.bmp")]) == 1
    assert "cannot tell the format" in capsys.readouterr().err


def test_cli_status_through_python_m_bigpool(burning: Burning) -> None:
    proc = subprocess.run([sys.executable, "-m", "bigpool", "status", burning.url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    for addr in burning.addrs:
        assert any(line.startswith(addr) and "RUNNING" in line
                   for line in proc.stdout.splitlines()), proc.stdout
    assert "queued 0, running 2, done 0, failed 0, retried 0" in proc.stdout, proc.stdout
    refused = subprocess.run([sys.executable, "-m", "bigpool", "status", "127.0.0.1:1"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "cannot reach" in refused.stderr


def _has_pyspy_child(pid: int) -> bool:
    try:
        return any(c.name() == "py-spy" for c in psutil.Process(pid).children())
    except psutil.Error:
        return False


def test_machine_dying_during_a_profile_leaves_a_partial_profile_and_a_note(
    tmp_path: Path,
) -> None:
    gate, markers = tmp_path / "gate", tmp_path / "markers"
    markers.mkdir()
    b = bigpool.start("local", debug="127.0.0.1:0")
    try:
        survivor, victim = b.start(2, services={"Pub": Publisher()})
        for m in (survivor, victim):
            assert m.wait(bigpool.State.RUNNING, timeout=60) is bigpool.State.RUNNING, m.err()
        burner = threading.Thread(
            target=survivor.call, args=("Pub.burn_until", (str(gate), str(markers))),
            kwargs={"timeout": 120}, daemon=True)
        burner.start()
        wait_until(lambda: len(os.listdir(markers)) == 1, 60, "the survivor to burn")
        reply: dict[str, Any] = {}

        def fetch() -> None:
            reply["response"] = get(f"{b.debug_url}/debug/bigmachine/pprof/profile?seconds=4",
                                    timeout=120)

        fetcher = threading.Thread(target=fetch, daemon=True)
        started = time.monotonic()
        fetcher.start()
        assert victim.pid is not None
        wait_until(lambda: _has_pyspy_child(victim.pid), 30, "py-spy to run on the victim")
        b.system.kill(victim)  # type: ignore[attr-defined]
        fetcher.join(60)
        assert not fetcher.is_alive(), "the profile request hung after a machine died"
        assert time.monotonic() - started < 60
        status, body, headers = reply["response"]
        assert status == 200, body
        profile = read(body)
        assert sorted(samples_by_machine(profile, "burn_until")) == [survivor.addr]
        notes = [c for c in profile.comments if c.startswith(victim.addr)]
        assert notes and "profile lost" in notes[0], profile.comments
        assert victim.addr in headers["X-Bigpool-Profile-Notes"]
    finally:
        gate.touch()
        url = b.debug_url
        b.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/debug/bigmachine/status", timeout=5)


def test_debug_address_from_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bigpool.add_arguments(parser)
    args = parser.parse_args(["--bigpool-system", "test", "--bigpool-debug", ":0"])
    with bigpool.start(args=args) as b:
        assert b.debug_url is not None and b.debug_url.startswith("http://127.0.0.1:")
        # Bound on loopback only (no host given), as the socket itself says.
        port = int(b.debug_url.rsplit(":", 1)[1].split("/")[0])
        me = psutil.Process()
        connections = getattr(me, "net_connections", None) or me.connections  # psutil < 6
        listening = [c.laddr for c in connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        status, body, _ = get(f"{b.debug_url}/debug/bigmachine/status?format=json")
        assert status == 200 and json.loads(body)["machines"] == []
        server_thread = b._debug._thread  # type: ignore[union-attr]
    assert not server_thread.is_alive(), "the debug server outlived B.shutdown"
    monkeypatch.setenv("BIGPOOL_DEBUG", "127.0.0.1:0")
    with bigpool.start("test") as b:
        assert b.debug_url is not None
    monkeypatch.setenv("BIGPOOL_DEBUG", "")
    with bigpool.start("test") as b:
        assert b.debug_url is None
    with pytest.raises(ValueError, match="port number"):
        bigpool.start("test", debug="127.0.0.1:http")


def test_in_process_machines_are_profiled_once(tmp_path: Path) -> None:
    gate, markers = tmp_path / "gate", tmp_path / "markers"
    markers.mkdir()
    pool = bigpool.BigPool(2, system="test", debug="127.0.0.1:0")
    try:
        result = pool.starmap_async(burn_until, [(str(gate), str(markers))] * 2, chunksize=1)
        wait_until(lambda: len(os.listdir(markers)) == 2, 60, "both workers to start burning")
        # Keep the driver's process busy too, so double counting would show.
        in_driver = threading.Thread(target=burn_until, args=(str(gate), str(markers)), daemon=True)
        in_driver.start()
        wait_until(lambda: len(os.listdir(markers)) == 3, 60, "the driver to burn")
        status, body, _ = get(f"{pool.b.debug_url}/debug/bigmachine/pprof/profile?seconds=1")
        assert status == 200, body
        profile = read(body)
        assert samples_by_machine(profile, "burn_until").get("driver", 0) > 0
        machines_of_pid: dict[int, set[str]] = {}
        for sample in profile.samples:
            machines_of_pid.setdefault(sample.num_labels["pid"], set()).add(sample.labels["machine"])
        # The machines live in the driver's process: it is sampled once, as the driver.
        assert machines_of_pid[os.getpid()] == {"driver"}
        assert all(len(m) == 1 for m in machines_of_pid.values()), machines_of_pid
        assert sorted(samples_by_machine(profile, "burn_until")) == sorted(
            ["driver", *(m.addr for m in pool.machines)])
        gate.touch()
        result.get(timeout=60)
    finally:
        gate.touch()
        pool.terminate()


def test_without_ptrace_rights_the_error_says_how_to_grant_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from bigpool import pyspy

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run py-spy as an unprivileged user")
    wrapper = tmp_path / "py-spy-as-nobody"
    wrapper.write_text(f'#!/bin/sh\nexec {setpriv} --reuid=65534 --regid=65534 --clear-groups '
                       f'{pyspy.pyspy_path()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv(pyspy.PYSPY_ENV, str(wrapper))
    with pytest.raises(pyspy.PySpyError) as caught:
        asyncio.run(pyspy.dump(os.getpid()))
    message = str(caught.value)
    for text in (f"pid {os.getpid()}", "Permission Denied", "CAP_SYS_PTRACE", "ptrace_scope"):
        assert text in message, message
    from bigpool.h2rpc.errors import decode_error, encode_error

    travelled = decode_error(encode_error(caught.value))  # as it comes back from a machine
    assert isinstance(travelled, pyspy.PySpyError) and str(travelled) == message
    with bigpool.start("test", debug="127.0.0.1:0") as b:
        status, body, _ = get(f"{b.debug_url}/debug/bigmachine/pprof/profile?seconds=1")
    assert status == 502, body
    assert b"no process could be profiled" in body and b"CAP_SYS_PTRACE" in body, body


def test_heap_where_tracemalloc_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    monkeypatch.setenv("PYTHONTRACEMALLOC", "1")  # local machines inherit the environment
    tracemalloc.start()
    try:
        with bigpool.start("local", debug="127.0.0.1:0") as b:
            (m,) = b.start(1, services={"Pub": Publisher()})
            assert m.wait(bigpool.State.RUNNING, timeout=60) is bigpool.State.RUNNING, m.err()
            status, body, _ = get(f"{b.debug_url}/debug/bigmachine/pprof/heap")
            assert status == 200, body
            text = body.decode()
            assert "=== driver ===" in text and f"=== {m.addr} ===" in text
            machine_part = text.split(f"=== {m.addr} ===", 1)[1]
            assert "size=" in machine_part and "count=" in machine_part, machine_part[:500]
            status, body, _ = get(f"{b.debug_url}/debug/bigmachine/pprof/")
            assert f"tracemalloc top sites on driver, {m.addr}" in body.decode()
    finally:
        tracemalloc.stop()


def test_expvars_published_in_pool_tasks_reach_debug_vars() -> None:
    from debug_tasks import count_rows

    with bigpool.BigPool(2, system="test", debug="127.0.0.1:0") as pool:
        assert sum(pool.map(count_rows, range(1, 21), chunksize=1)) == 210
        status, body, _ = get(f"{pool.b.debug_url}/debug/vars")
        assert status == 200
        machines = json.loads(body)["machines"]
        totals = [m["BigPoolWorker"]["expvars"] for m in machines.values()]
        assert len(totals) == 2
        # Every task's counter arrives, summed over each machine's workers.
        assert sum(t.get("rows_seen", 0) for t in totals) == 210, totals
        pids = {p for m in machines.values() for p in m["BigPoolWorker"]["worker_pids"]}
        assert {t["last_pid"] for t in totals if "last_pid" in t} <= pids


def test_expvar_api_names_bad_input() -> None:
    with pytest.raises(TypeError, match="non-empty string"):
        bigpool.expvar_add("", 1)
    with pytest.raises(TypeError, match="delta must be a number"):
        bigpool.expvar_add("x", "1")  # type: ignore[arg-type]
    bigpool.expvar_set("a_gauge", "text")
    with pytest.raises(TypeError, match="cannot be added to"):
        bigpool.expvar_add("a_gauge")
