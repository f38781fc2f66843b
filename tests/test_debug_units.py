"""The debug endpoint's sans-IO parts: pprof encoding, folded stacks, flame graph, status page,
addresses. The pprof bytes are read back by tests/pprof_reader.py, an independent decoder."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET

import pytest
from pprof_reader import read

from bigpool.debug import flamegraph
from bigpool.debug.pprof import Frame, Profile, parse_frame
from bigpool.debug.server import parse_listen_address
from bigpool.debug.status import render_html, render_text

SVG = "{http://www.w3.org/2000/svg}"

MACHINE_A = (
    'process 101:"machine";<module> (/app/main.py:3);serve (/app/main.py:9) 7\n'
    'process 102:"worker";<module> (/app/w.py:1);spin (/app/tasks.py:5) 30\n'
    'process 102:"worker";<module> (/app/w.py:1);spin (/app/tasks.py:6) 10\n'
)
MACHINE_B = (
    'process 201:"worker";<module> (/app/w.py:1);spin (/app/tasks.py:5) 25\n'
    "# worker pid 202 not profiled: py-spy record of pid 202 failed: it exited.\n"
)


def two_machines() -> Profile:
    profile = Profile(period_ns=10_000_000, duration_ns=2_000_000_000)
    profile.add_folded(MACHINE_A, {"machine": "https://127.0.0.1:1/"})
    profile.add_folded(MACHINE_B, {"machine": "https://127.0.0.1:2/"})
    return profile


def test_parse_frame_forms() -> None:
    assert parse_frame("spin (/app/tasks.py:5)") == Frame("spin", "/app/tasks.py", 5)
    assert parse_frame("<lambda> (C:/x (y)/f.py:12)") == Frame("<lambda>", "C:/x (y)/f.py", 12)
    assert parse_frame("native (libc.so.6)") == Frame("native", "libc.so.6", 0)
    assert parse_frame("weird frame") == Frame("weird frame")


def test_folded_lines_become_labelled_samples_and_notes() -> None:
    profile = two_machines()
    assert profile.total == 7 + 30 + 10 + 25
    assert profile.label_values("machine") == {"https://127.0.0.1:1/", "https://127.0.0.1:2/"}
    assert profile.label_values("pid") == {"101", "102", "201"}
    assert profile.notes == ["https://127.0.0.1:2/: worker pid 202 not profiled: py-spy record "
                             "of pid 202 failed: it exited."]


def test_pprof_reads_back_with_an_independent_decoder() -> None:
    profile = two_machines()
    data = profile.gzipped()
    assert data[:2] == b"\x1f\x8b"
    parsed = read(data)
    assert parsed.sample_types == [("samples", "count"), ("cpu", "nanoseconds")]
    assert parsed.period_type == ("cpu", "nanoseconds") and parsed.period == 10_000_000
    assert parsed.duration_nanos == 2_000_000_000
    spins = [s for s in parsed.samples if s.functions[0] == "spin"]
    by_machine: dict[str, int] = {}
    for s in spins:
        assert s.functions == ["spin", "<module>"]  # leaf first
        assert s.files[0] == "/app/tasks.py"
        assert s.values[1] == s.values[0] * 10_000_000
        assert s.labels["role"] == "worker"
        by_machine[s.labels["machine"]] = by_machine.get(s.labels["machine"], 0) + s.values[0]
    assert by_machine == {"https://127.0.0.1:1/": 40, "https://127.0.0.1:2/": 25}
    assert {s.num_labels["pid"] for s in parsed.samples} == {101, 102, 201}
    assert sum(s.values[0] for s in parsed.samples) == profile.total
    assert parsed.comments == profile.notes


def test_pprof_large_values_and_unicode_names() -> None:
    profile = Profile(period_ns=10_000_000)
    profile.add([Frame("größe→λ", "/ü/f.py", 70000)], 3_000_000_000, {"machine": "m"})
    parsed = read(profile.encode())
    (sample,) = parsed.samples
    assert sample.functions == ["größe→λ"] and sample.files == ["/ü/f.py"]
    assert sample.values == [3_000_000_000, 3_000_000_000 * 10_000_000]


def test_merge_adds_counts_of_equal_stacks() -> None:
    one, two = two_machines(), two_machines()
    one.merge(two)
    assert one.total == 2 * two.total
    assert len(one.samples) == len(two.samples)
    assert len(one.notes) == 2


def test_collapsed_round_trips_and_groups() -> None:
    profile = two_machines()
    text = profile.collapsed()
    assert text.startswith("# ")
    again = Profile()
    assert again.add_folded(text) == profile.total
    assert again.stacks() == profile.stacks()
    by_function = profile.stacks(lines=False)
    assert by_function[("<module> (w.py)", "spin (tasks.py)")] == 65
    grouped = profile.collapsed(group_by="machine", lines=False)
    assert "machine https://127.0.0.1:2/;<module> (w.py);spin (tasks.py) 25\n" in grouped


def test_flamegraph_is_well_formed_svg_with_proportional_frames() -> None:
    stacks = {("main", "spin <&>"): 75, ("main", "idle"): 25}
    svg = flamegraph.render(stacks, title="t <1>", notes=["machine x lost & gone"])
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    titles = {g.find(f"{SVG}title").text: g for g in root.iter(f"{SVG}g")}  # type: ignore[union-attr]
    spin = next(g for t, g in titles.items() if t.startswith("spin <&>"))
    assert "75 samples, 75.00%" in spin.find(f"{SVG}title").text  # type: ignore[union-attr,operator]
    full = float(root.find(f"{SVG}g/{SVG}rect").get("width"))  # type: ignore[union-attr,arg-type]
    width = float(spin.find(f"{SVG}rect").get("width"))  # type: ignore[union-attr,arg-type]
    assert width == pytest.approx(0.75 * full, rel=0.01)
    texts = "".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "machine x lost & gone" in texts and "t <1>" in texts


def test_flamegraph_of_a_deep_stack_and_of_nothing() -> None:
    deep = {tuple(f"f{i}" for i in range(3000)): 5}
    ET.fromstring(flamegraph.render(deep))
    empty = ET.fromstring(flamegraph.render({}))
    assert "no samples" in "".join(t.text or "" for t in empty.iter(f"{SVG}text"))


def test_listen_address_forms_and_errors() -> None:
    assert parse_listen_address("127.0.0.1:3333") == ("127.0.0.1", 3333)
    assert parse_listen_address(":3333") == ("127.0.0.1", 3333)
    assert parse_listen_address("0") == ("127.0.0.1", 0)
    assert parse_listen_address("[::1]:80") == ("::1", 80)
    for bad in ("localhost", "127.0.0.1:99999", "x:-1", ""):
        with pytest.raises(ValueError, match="port number"):
            parse_listen_address(bad)


STATUS = {
    "driver": {"pid": 7, "hostname": "h", "system": "local", "python": "3.11", "uptime_seconds": 5},
    "machines": [
        {"addr": "https://127.0.0.1:1/", "state": "RUNNING", "maxprocs": 2, "uptime_seconds": 3725,
         "calls_in_flight": 1, "keepalive_reply_ms": [1.5, 2.25],
         "mem": {"used": 2 << 30, "total": 8 << 30, "percent": 25.0, "process_rss": 50 << 20},
         "disk": {"used": 1 << 30, "total": 4 << 30, "percent": 25.0},
         "load": {"load1": 1.0, "load5": 0.5, "load15": 0.25, "cpus": 2}},
        {"addr": "https://127.0.0.1:2/", "state": "STOPPED", "error": "NetworkError: <lost>"},
    ],
    "pool": {"tasks": {"queued": 4, "running": 2, "done": 10, "failed": 1, "retried": 0},
             "throughput_per_second": 2.5},
}


def test_status_html_names_every_machine_and_escapes() -> None:
    html = render_html(STATUS, refresh=5)
    for text in ("https://127.0.0.1:1/", "https://127.0.0.1:2/", "RUNNING", "STOPPED",
                 "NetworkError: &lt;lost&gt;", "1h2m5s", "2.0 GiB (25%) of 8.0 GiB",
                 "1.00 0.50 0.25", "1.5 2.2", "2.5/s", "throughput", "queued", "50.0 MiB",
                 "content='5'"):
        assert text in html, text
    assert "<lost>" not in html


def test_status_text_has_a_row_per_machine() -> None:
    text = render_text(STATUS)
    lines = text.splitlines()
    assert any(line.startswith("https://127.0.0.1:1/") and "RUNNING" in line for line in lines)
    assert any(line.startswith("https://127.0.0.1:2/") and "NetworkError" in line for line in lines)
    assert "pool: queued 4, running 2, done 10, failed 1, retried 0" in text


def test_gzip_is_deterministic() -> None:
    assert two_machines().gzipped() == two_machines().gzipped()
    assert gzip.decompress(two_machines().gzipped()) == two_machines().encode()


def test_python_m_bigpool_dispatches_and_names_unknown_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bigpool.__main__ import main

    assert main([]) == 2
    assert main(["nope"]) == 2
    usage = capsys.readouterr().err
    assert "usage: python -m bigpool {" in usage and "profile" in usage and "status" in usage
    assert main(["--help"]) == 0
    with pytest.raises(SystemExit) as exited:
        main(["profile", "http://127.0.0.1:1", "--seconds", "0"])
    assert exited.value.code == 2
    assert "--seconds must be from 1 to 600" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["status", "--help"])
    assert exited.value.code == 0
    assert "python -m bigpool status" in capsys.readouterr().out
