"""The EC2 machine's own pieces without EC2: the first stage's checks, and per-environment
venvs that install what the base environment lacks (from a local wheel, never the internet)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bigpool.h2rpc import Authority, Credentials
from bigpool.systems import ec2_stage1
from bigpool.systems.ec2_boot import BOOT_NAME, BootHandoffError, hand_off
from bigpool.systems.ec2_venv import READY_MARKER, environment_key, prepare_venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_first_stage_accepts_only_its_cluster_and_gives_up_in_time(tmp_path: Path) -> None:
    cluster, stranger = Authority.create(), Authority.create()
    state = tmp_path / "state"
    state.mkdir()
    boot = cluster.issue("boot", dns=[BOOT_NAME])
    (state / "boot-cert.pem").write_bytes(boot.cert_pem)
    (state / "boot-key.pem").write_bytes(boot.key_pem)
    (state / "ca.pem").write_bytes(boot.ca_pem)
    port = _free_port()
    (state / "boot.json").write_text(json.dumps({"host": "127.0.0.1", "port": port,
                                                 "boot_timeout": 4}))
    log = tmp_path / "stage1.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, ec2_stage1.__file__, str(state)],
                                stdout=out, stderr=out)
    try:
        started = time.monotonic()
        # A driver of another cluster: the machine's boot certificate is not signed by its CA.
        with pytest.raises(BootHandoffError, match="certificate is not ours"):
            hand_off("127.0.0.1", port, driver_credentials=stranger.issue("driver"),
                     machine_credentials=stranger.issue("m"), timeout=3)
        # Our driver, but credentials carrying a CA key: refused, nothing is handed over.
        leaf = cluster.issue("m", ips=["127.0.0.1"])
        with_ca_key = Credentials(leaf.cert_pem, leaf.key_pem,
                                  leaf.ca_pem + leaf.key_pem.replace(b"PRIVATE", b"EC PRIVATE"))
        with pytest.raises(BootHandoffError, match="no answer within"):
            hand_off("127.0.0.1", port, driver_credentials=cluster.issue("driver"),
                     machine_credentials=with_ca_key, timeout=0.5)
        assert not (state / "bootstrap").exists() or not os.listdir(state / "bootstrap")
        assert proc.wait(timeout=15) == 2  # nobody handed off within boot_timeout
        assert time.monotonic() - started >= 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "refusing it" in text and "no driver handed off in time" in text


def _wheel(directory: Path, name: str, version: str) -> None:
    """A minimal pure-Python wheel, written by hand (no build backend, no network)."""
    files = {
        f"{name}.py": b"VALUE = 42\n",
        f"{name}-{version}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(exist_ok=True)
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)


def test_venv_installs_what_the_base_lacks_and_is_reused(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _wheel(wheels, "bigpool_tinydist", "1.0")
    python_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    dists = [
        ("bigpool-tinydist", "1.0"),  # not in the base: installed from the wheel directory
        ("dill", importlib.metadata.version("dill")),  # in the base at this version: layered
        ("bigpool", "0.0.0-unpublished"),  # never installed from an index
        ("bigpool-no-such-dist", "9.9"),  # nowhere to be found: reported, left out
    ]
    root = tmp_path / "venvs"
    python = prepare_venv(dists, python_version, str(root),
                          pip_args=["--no-index", "--find-links", str(wheels)])
    venv = root / environment_key(dists, python_version)
    assert python == str(venv / "bin" / "python")
    out = subprocess.run(
        [python, "-c", "import bigpool_tinydist, dill, sys; "
                       "print(bigpool_tinydist.VALUE, sys.prefix, dill.__file__)"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    assert out[0] == "42" and out[1] == str(venv)
    assert not out[2].startswith(str(venv))  # dill comes from the base environment
    report = json.loads((venv / "bigpool-installed.json").read_text())
    assert report == {"installed": ["bigpool-tinydist==1.0"], "failed": ["bigpool-no-such-dist==9.9"]}
    made = (venv / READY_MARKER).stat().st_mtime_ns
    assert prepare_venv(dists, python_version, str(root), pip_args=["--no-index"]) == python
    assert (venv / READY_MARKER).stat().st_mtime_ns == made
