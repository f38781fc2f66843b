"""Bundles: what code travels, that it imports from the zip alone, determinism, storage, wire."""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dill
import h2
import pytest

import bigpool
import bigpool.bundle as bundle_mod
from bigpool.bundle import (
    Bundle,
    build_bundle,
    bundle_store_dir,
    current_bundle,
    deserialize_bundle,
    read_bundle,
    serialize_bundle,
    stored_digests,
    write_bundle,
)

NAMES = ("bpt_pkg", "bpt_mod", "bpt_ns")


@dataclass
class CodeTree:
    src: Path
    modules: dict[str, types.ModuleType]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def codetree(tmp_path: Path) -> Iterator[CodeTree]:
    """A package (with a never-imported subpackage and data files), a single-file module and a
    namespace package in a temporary directory, imported through a sys.path entry."""
    src = tmp_path / "src"
    _write(src / "bpt_pkg" / "__init__.py", "from .core import VALUE\n")
    _write(src / "bpt_pkg" / "core.py", "VALUE = 'core'\n")
    _write(src / "bpt_pkg" / "lazy" / "__init__.py", "")
    _write(src / "bpt_pkg" / "lazy" / "deep.py", "DEEP = 'deep'\n")
    _write(src / "bpt_pkg" / "resource.txt", "hello resource\n")
    _write(src / "bpt_pkg" / "data" / "table.txt", "a,b\n1,2\n")
    (src / "bpt_pkg" / "__pycache__").mkdir()
    (src / "bpt_pkg" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"junk")
    (src / "bpt_pkg" / "stale.pyc").write_bytes(b"junk")
    _write(src / "bpt_mod.py", "def f():\n    return 'mod'\n")
    _write(src / "bpt_ns" / "portion.py", "P = 'portion'\n")
    sys.path.insert(0, str(src))
    importlib.invalidate_caches()
    try:
        mods = {
            "bpt_pkg": importlib.import_module("bpt_pkg"),
            "bpt_pkg.core": importlib.import_module("bpt_pkg.core"),
            "bpt_mod": importlib.import_module("bpt_mod"),
            "bpt_ns": importlib.import_module("bpt_ns"),
            "bpt_ns.portion": importlib.import_module("bpt_ns.portion"),
        }
        assert "bpt_pkg.lazy" not in sys.modules
        yield CodeTree(src, mods)
    finally:
        sys.path.remove(str(src))
        for name in list(sys.modules):
            if name.partition(".")[0] in NAMES:
                del sys.modules[name]
        importlib.invalidate_caches()


def _names(b: Bundle) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(b.code)) as zf:
        return zf.namelist()


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------------------------------------
# What travels


def test_bundle_imports_from_zip_alone(codetree: CodeTree, tmp_path: Path) -> None:
    b = build_bundle()  # from sys.modules
    assert {"bpt_pkg", "bpt_mod", "bpt_ns"} <= set(b.modules)
    names = _names(b)
    for entry in (
        "bpt_pkg/__init__.py",
        "bpt_pkg/core.py",
        "bpt_pkg/lazy/__init__.py",  # never imported, still travels
        "bpt_pkg/lazy/deep.py",
        "bpt_pkg/resource.txt",
        "bpt_pkg/data/table.txt",
        "bpt_mod.py",
        "bpt_ns/portion.py",
    ):
        assert entry in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert names == sorted(names)

    zpath = tmp_path / "bundle.zip"
    zpath.write_bytes(b.code)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"""
import importlib.resources, json, pkgutil, sys
zpath = {str(zpath)!r}
assert not any({str(codetree.src)!r} in p for p in sys.path), sys.path
sys.path.insert(0, zpath)
import bpt_pkg, bpt_pkg.lazy.deep, bpt_mod, bpt_ns.portion
print(json.dumps({{
    "files": [m.__file__ for m in (bpt_pkg, bpt_pkg.lazy.deep, bpt_mod, bpt_ns.portion)],
    "values": [bpt_pkg.VALUE, bpt_pkg.lazy.deep.DEEP, bpt_mod.f(), bpt_ns.portion.P],
    "resource": importlib.resources.files("bpt_pkg").joinpath("resource.txt").read_text(),
    "data": pkgutil.get_data("bpt_pkg", "data/table.txt").decode(),
}}))
"""
    proc = _run(script, elsewhere)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert all(f.startswith(str(zpath) + os.sep) for f in out["files"]), out["files"]
    assert out["values"] == ["core", "deep", "mod", "portion"]
    assert out["resource"] == "hello resource\n"
    assert out["data"] == "a,b\n1,2\n"


def test_stdlib_site_packages_and_main_stay_home(codetree: CodeTree, tmp_path: Path) -> None:
    default = build_bundle()
    for name in ("json", "os", "dill", "h2", "pytest", "_pytest", "__main__"):
        assert name not in default.modules
    assert not any(n.startswith(("json/", "dill/", "h2/")) for n in _names(default))

    driver = tmp_path / "driver.py"
    driver.write_text("def main():\n    return 1\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(driver)
    # A module imported from a zip file, and one with no file at all: neither travels.
    zipped = tmp_path / "zipped.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("bpt_zipped.py", "X = 1\n")
    sys.path.insert(0, str(zipped))
    try:
        zmod = importlib.import_module("bpt_zipped")
    finally:
        sys.path.remove(str(zipped))
        sys.modules.pop("bpt_zipped", None)
    mapping = {
        "json": json,
        "dill": dill,
        "h2": h2,
        "sys": sys,
        "__main__": main,
        "bpt_zipped": zmod,
    }
    assert build_bundle(mapping).modules == ()
    # The same script under another name is user code, and travels: the exclusion is by name.
    assert build_bundle({"driver": main}).modules == ("driver",)


def test_development_bigpool_travels_installed_does_not() -> None:
    installed = any(p in Path(bigpool.__file__).parts for p in ("site-packages", "dist-packages"))
    assert ("bigpool" in build_bundle({"bigpool": bigpool}).modules) is not installed


def test_explicit_modules_and_exclude(codetree: CodeTree) -> None:
    b = build_bundle(
        {"bpt_pkg": codetree.modules["bpt_pkg"], "bpt_mod": codetree.modules["bpt_mod"]}
    )
    assert b.modules == ("bpt_mod", "bpt_pkg")
    b = build_bundle(codetree.modules, exclude=["bpt_mod", "bpt_pkg.lazy"])
    assert b.modules == ("bpt_ns", "bpt_pkg")
    names = _names(b)
    assert "bpt_pkg/core.py" in names
    assert not any(n.startswith("bpt_pkg/lazy") for n in names)


def test_package_data_limit(codetree: CodeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    big = codetree.src / "bpt_pkg" / "big.bin"
    big.write_bytes(b"x" * 2000)
    monkeypatch.setattr(bundle_mod, "DATA_LIMIT", 1000)
    names = _names(build_bundle({"bpt_pkg": codetree.modules["bpt_pkg"]}))
    assert "bpt_pkg/big.bin" not in names
    assert "bpt_pkg/resource.txt" in names  # small data still travels
    assert "bpt_pkg/core.py" in names  # code is never limited
    monkeypatch.setattr(bundle_mod, "DATA_LIMIT", 10_000)
    assert "bpt_pkg/big.bin" in _names(build_bundle({"bpt_pkg": codetree.modules["bpt_pkg"]}))


# ---------------------------------------------------------------------------------------------
# Determinism and the environment


def test_deterministic_and_content_addressed(codetree: CodeTree, tmp_path: Path) -> None:
    a = build_bundle(codetree.modules)
    os.utime(codetree.src / "bpt_pkg" / "core.py", (1, 1))  # mtimes do not matter
    b = build_bundle(codetree.modules)
    assert a.code == b.code
    assert a.digest == b.digest
    assert a == b
    assert a.digest.startswith("sha256:") and len(a.digest) == len("sha256:") + 64

    # Another process, the same files: the same digest.
    script = f"""
import sys
sys.path.insert(0, {str(codetree.src)!r})
import bpt_pkg, bpt_mod, bpt_ns.portion
from bigpool.bundle import build_bundle
mods = {{n: sys.modules[n] for n in ("bpt_pkg", "bpt_pkg.core", "bpt_mod", "bpt_ns", "bpt_ns.portion")}}
print(build_bundle(mods).digest)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == a.digest

    # A change to a file that was never imported still changes the digest.
    with open(codetree.src / "bpt_pkg" / "lazy" / "deep.py", "a") as f:
        f.write("# changed\n")
    c = build_bundle(codetree.modules)
    assert c.digest != a.digest and c.code != a.code


def test_distributions() -> None:
    b = build_bundle({})
    dists = dict(b.distributions)
    assert dists["dill"] == importlib.metadata.version("dill")
    assert "h2" in dists
    assert list(b.distributions) == sorted(b.distributions)
    assert len(dists) == len(b.distributions)  # one entry per name
    assert all(n == n.lower() and "_" not in n and "." not in n for n in dists)
    assert b.python == f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_current_bundle_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = bundle_mod.build_bundle

    def counting(*args: object, **kw: object) -> Bundle:
        calls.append(1)
        return real({})

    monkeypatch.setattr(bundle_mod, "_current", None)
    monkeypatch.setattr(bundle_mod, "build_bundle", counting)
    results: list[Bundle] = []
    threads = [threading.Thread(target=lambda: results.append(current_bundle())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert current_bundle() is results[0]


# ---------------------------------------------------------------------------------------------
# The store and the wire


def test_store_round_trip(codetree: CodeTree, tmp_path: Path) -> None:
    b = build_bundle(codetree.modules)
    store = tmp_path / "cache" / "bundles"
    assert stored_digests(store) == []
    path = write_bundle(b, store)
    hexd = b.digest.removeprefix("sha256:")
    assert path == str(store / f"{hexd}.zip")
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store / f"{hexd}.json").st_mode) == 0o600
    manifest = json.loads((store / f"{hexd}.json").read_text())
    assert manifest["digest"] == b.digest and manifest["modules"] == list(b.modules)
    assert stored_digests(store) == [b.digest]
    assert read_bundle(path) == b
    assert read_bundle(store / f"{hexd}.json") == b

    mtime = os.stat(path).st_mtime_ns
    assert write_bundle(b, store) == path  # idempotent
    assert os.stat(path).st_mtime_ns == mtime
    assert sorted(os.listdir(store)) == [f"{hexd}.json", f"{hexd}.zip"]  # no temporary left

    other = build_bundle({"bpt_mod": codetree.modules["bpt_mod"]})
    write_bundle(other, store)
    assert stored_digests(store) == sorted([b.digest, other.digest])


def test_tampered_store_is_refused(codetree: CodeTree, tmp_path: Path) -> None:
    b = build_bundle(codetree.modules)
    path = Path(write_bundle(b, tmp_path / "store"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest mismatch"):
        read_bundle(path)

    # A manifest that lies about the environment is refused as well.
    path2 = Path(
        write_bundle(build_bundle({"bpt_mod": codetree.modules["bpt_mod"]}), tmp_path / "s2")
    )
    mpath = path2.with_suffix(".json")
    manifest = json.loads(mpath.read_text())
    manifest["distributions"][0][1] = "0.0.0-evil"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="digest mismatch"):
        read_bundle(path2)


def test_serialize_round_trip_and_tamper(codetree: CodeTree) -> None:
    b = build_bundle(codetree.modules)
    wire = serialize_bundle(b)
    assert isinstance(wire, bytes)
    assert deserialize_bundle(wire) == b
    tampered = bytearray(wire)
    tampered[-30] ^= 0x01  # inside the zip
    with pytest.raises(ValueError, match="digest mismatch"):
        deserialize_bundle(bytes(tampered))
    with pytest.raises(ValueError):
        deserialize_bundle(b"NOTABNDL" + wire[8:])
    with pytest.raises(ValueError):
        deserialize_bundle(wire[:20])


def test_bundle_store_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BIGPOOL_BUNDLE_DIR", str(tmp_path / "here"))
    assert bundle_store_dir() == str(tmp_path / "here")
    monkeypatch.delenv("BIGPOOL_BUNDLE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bundle_store_dir() == str(tmp_path / ".cache" / "bigpool" / "bundles")
