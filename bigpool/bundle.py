"""Bundles: the driver's own code and environment, packaged to travel to machines.

Bigmachine's driver uploads its own binary to every machine. The Python analogue is a *bundle*:

* **code**: a deterministic zip of the driver's own importable code, i.e. every module in
  ``sys.modules`` whose file lies outside the standard library, outside site-packages and
  dist-packages, and outside the interpreter's install directories. Modules are grouped by
  top-level name; a top-level package travels as its whole directory (every ``.py`` file, so
  lazily imported submodules work, plus small package data files), a top-level single-file
  module as ``<name>.py``. Put the zip on ``sys.path`` and zipimport makes them importable.
  ``__main__`` never travels (the driver script's functions travel by value with dill); nor do
  modules loaded from zip files or without a ``__file__`` (builtins, frozen modules).
* **distributions**: the installed distributions, ``(normalised name, version)``, sorted.
* **python**: the interpreter's ``major.minor`` version.
* **digest**: ``"sha256:<hex>"`` over a canonical encoding of the three above, so two bundles
  with the same digest hold the same code for the same environment.

The same files always give a byte-identical zip (fixed timestamps and modes, sorted entries,
fixed compression level) on a given interpreter, so the digest is stable across runs and can name
the bundle in a store (:func:`write_bundle`) or on the wire (:func:`serialize_bundle`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import site
import stat
import struct
import sys
import sysconfig
import tempfile
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = [
    "DATA_LIMIT",
    "Bundle",
    "build_bundle",
    "bundle_store_dir",
    "current_bundle",
    "deserialize_bundle",
    "read_bundle",
    "serialize_bundle",
    "stored_digests",
    "write_bundle",
]

log = logging.getLogger(__name__)

#: Most bytes of package data files (anything but ``.py``) that one top-level package may add to
#: the zip. Files are taken in sorted path order; one that would go over the limit is left out.
DATA_LIMIT = 10 * 1024 * 1024

# Directory names never walked inside a package, and file suffixes never included.
_SKIP_DIRS = frozenset(
    {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox"}
)
_SKIP_SUFFIXES = (".pyc", ".pyo")
# Names that are the driver script itself, never shipped.
_MAIN_NAMES = frozenset({"__main__", "__mp_main__"})

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_LEVEL = 9
_FORMAT = 1
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_WIRE_MAGIC = b"BPBUNDL1"
_WIRE_HEADER = struct.Struct(">8sI")


@dataclass(frozen=True)
class Bundle:
    """A driver's code and environment, named by its digest.

    ``code`` is the zip (put it on ``sys.path`` to import from it); ``distributions`` the sorted
    ``(normalised name, version)`` pairs of installed distributions; ``python`` the
    ``"major.minor"`` version it was built on; ``digest`` ``"sha256:<hex>"`` over all three;
    ``modules`` the sorted top-level module and package names in the zip.
    """

    code: bytes = field(repr=False)
    distributions: tuple[tuple[str, str], ...]
    python: str
    digest: str
    modules: tuple[str, ...]

    @property
    def hexdigest(self) -> str:
        """The digest without its ``sha256:`` prefix (the name of the bundle in a store)."""
        return self.digest.partition(":")[2]


# ---------------------------------------------------------------------------------------------
# Building


def build_bundle(
    modules: Mapping[str, ModuleType] | None = None, *, exclude: Iterable[str] = ()
) -> Bundle:
    """Build a bundle of the code in ``modules`` (default: ``sys.modules``).

    A pure function of the modules given, the files they come from, and the installed
    distributions: each call walks the files again. ``exclude`` names modules to leave out: a
    top-level name leaves out that whole module or package, a dotted name that subpackage or
    submodule (and everything under it). See the module docstring for what is included.
    """
    if modules is None:
        modules = dict(sys.modules)
    excluded_names = tuple(exclude)
    roots = _ExcludedRoots()
    files: dict[str, bytes] = {}
    for top, sources in sorted(_code_sources(modules, roots, excluded_names).items()):
        if isinstance(sources, str):  # a single-file module
            data = _read(sources)
            if data is not None:
                files[f"{top}.py"] = data
            continue
        budget = [DATA_LIMIT]
        for directory in sources:  # namespace portions in path order: the first file wins
            for arcname, data in _package_files(top, directory, roots, excluded_names, budget):
                files.setdefault(arcname, data)
    code = _make_zip(files)
    distributions = _distributions()
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return Bundle(
        code=code,
        distributions=distributions,
        python=python,
        digest=_digest(code, distributions, python),
        modules=_zip_modules(code),
    )


_current: Bundle | None = None
_current_lock = threading.Lock()


def current_bundle() -> Bundle:
    """``build_bundle()`` for this process, built once on first call and then reused.

    Thread-safe. Modules imported after the first call are not in it (lazily imported submodules
    of packages already loaded are, since whole package directories travel).
    """
    global _current
    with _current_lock:
        if _current is None:
            _current = build_bundle()
        return _current


def _code_sources(
    modules: Mapping[str, Any], roots: _ExcludedRoots, exclude: tuple[str, ...]
) -> dict[str, str | list[str]]:
    """Top-level name -> the ``.py`` file of a single-file module, or a package's directories."""
    tops = sorted({name.partition(".")[0] for name in modules if isinstance(name, str)})
    out: dict[str, str | list[str]] = {}
    for top in tops:
        if top in _MAIN_NAMES or not top.isidentifier() or _is_excluded_name(top, exclude):
            continue
        module = modules.get(top)
        if module is None:
            continue
        spec = getattr(module, "__spec__", None)
        if getattr(spec, "origin", None) in ("built-in", "frozen"):
            continue
        file = getattr(module, "__file__", None)
        path = getattr(module, "__path__", None)
        if path is not None:  # a package
            if isinstance(file, str) and os.path.basename(file).startswith("__init__."):
                dirs = [os.path.dirname(file)]  # regular: its own directory
            else:
                try:
                    dirs = [p for p in list(path) if isinstance(p, str)]  # namespace portions
                except Exception:  # a broken custom __path__
                    continue
            dirs = [os.path.abspath(d) for d in dirs if os.path.isdir(d) and not roots.excludes(d)]
            if dirs:
                out[top] = list(dict.fromkeys(dirs))
        elif (
            isinstance(file, str)
            and file.endswith(".py")
            and os.path.isfile(file)
            and not roots.excludes(file)
        ):
            out[top] = os.path.abspath(file)
    return out


def _package_files(
    top: str,
    directory: str,
    roots: _ExcludedRoots,
    exclude: tuple[str, ...],
    budget: list[int],
) -> Iterator[tuple[str, bytes]]:
    """The zip entries (arcname, bytes) of one package directory, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(directory):
        rel = os.path.relpath(dirpath, directory)
        parts = [] if rel == os.curdir else rel.split(os.sep)
        prefix = "/".join([top, *parts])
        keep = []
        for d in sorted(dirnames):
            sub = os.path.join(dirpath, d)
            if (
                d in _SKIP_DIRS
                or _is_excluded_name(".".join([top, *parts, d]), exclude)
                or os.path.exists(os.path.join(sub, "pyvenv.cfg"))
                or roots.excludes(sub)
            ):
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.endswith(_SKIP_SUFFIXES):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if name.endswith(".py"):
                module = ".".join([top, *parts, name[: -len(".py")]])
                if name != "__init__.py" and _is_excluded_name(module, exclude):
                    continue
            else:
                if st.st_size > budget[0]:
                    log.debug(
                        "bundle: leaving out %s (package data over %d bytes)", full, DATA_LIMIT
                    )
                    continue
                budget[0] -= st.st_size
            data = _read(full)
            if data is not None:
                yield f"{prefix}/{name}", data


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        log.debug("bundle: cannot read %s: %s", path, e)
        return None


def _is_excluded_name(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


class _ExcludedRoots:
    """The standard library, site-packages and interpreter install directories."""

    def __init__(self) -> None:
        dirs: set[str] = set()
        prefixes = {
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            getattr(sys, "base_exec_prefix", sys.exec_prefix),
        }
        keys = ("stdlib", "platstdlib", "purelib", "platlib")
        paths = [sysconfig.get_paths()]
        for prefix in prefixes:
            variables = {
                "base": prefix,
                "platbase": prefix,
                "installed_base": prefix,
                "installed_platbase": prefix,
            }
            with contextlib.suppress(Exception):
                paths.append(sysconfig.get_paths(vars=variables))
        for p in paths:
            dirs.update(p[k] for k in keys if k in p)
        dirs.add(os.path.dirname(os.__file__))
        with contextlib.suppress(Exception):
            dirs.update(site.getsitepackages())
        with contextlib.suppress(Exception):
            dirs.add(site.getusersitepackages())
        for prefix in prefixes:  # <prefix>/lib/pythonX.Y and friends, whatever the scheme says
            for lib in ("lib", "lib64"):
                dirs.add(
                    os.path.join(prefix, lib, f"python{sys.version_info[0]}.{sys.version_info[1]}")
                )
            dirs.add(os.path.join(prefix, "Lib"))
        forms: set[str] = set()
        for d in dirs:
            if d:
                forms.add(os.path.normcase(os.path.abspath(d)))
                forms.add(os.path.normcase(os.path.realpath(d)))
        self.dirs = tuple(sorted(forms))

    def excludes(self, path: str) -> bool:
        """Whether ``path`` (a file or directory) lies in an excluded directory."""
        for form in {
            os.path.normcase(os.path.abspath(path)),
            os.path.normcase(os.path.realpath(path)),
        }:
            parts = form.split(os.sep)
            if "site-packages" in parts or "dist-packages" in parts:
                return True
            for d in self.dirs:
                if form == d or form.startswith(d.rstrip(os.sep) + os.sep):
                    return True
        return False


def _make_zip(files: Mapping[str, bytes]) -> bytes:
    """A deterministic zip of ``files`` with explicit directory entries (zipimport of namespace
    packages needs them on older Pythons)."""
    entries: dict[str, bytes | None] = {}
    for arcname in files:
        parts = arcname.split("/")
        for i in range(1, len(parts)):
            entries["/".join(parts[:i]) + "/"] = None
    entries.update(files)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for arcname in sorted(entries):
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
            info.create_system = 3
            data = entries[arcname]
            if data is None:
                info.external_attr = (0o40755 << 16) | 0x10
                info.compress_type = zipfile.ZIP_STORED
                zf.writestr(info, b"")
            else:
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data, compresslevel=_ZIP_LEVEL)
    return buf.getvalue()


def _zip_modules(code: bytes) -> tuple[str, ...]:
    """The top-level module and package names in a bundle's zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(code)) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"bundle code is not a valid zip: {e}") from e
    tops: set[str] = set()
    for name in names:
        head, sep, _ = name.partition("/")
        if sep:
            tops.add(head)
        elif name.endswith(".py"):
            tops.add(name[: -len(".py")])
    return tuple(sorted(tops))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distributions() -> tuple[tuple[str, str], ...]:
    """Installed distributions, first on the path wins for a name, sorted."""
    seen: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        try:
            name = dist.metadata["Name"]
            version = dist.version
        except Exception:  # broken metadata: not something a machine could install anyway
            continue
        if not isinstance(name, str) or not name or not isinstance(version, str):
            continue
        seen.setdefault(_normalise(name), version)
    return tuple(sorted(seen.items()))


def _digest(code: bytes, distributions: Iterable[tuple[str, str]], python: str) -> str:
    """``sha256:<hex>`` over a length-prefixed canonical encoding of the bundle's contents."""
    env = json.dumps(
        {"distributions": [list(d) for d in distributions], "python": python},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    h = hashlib.sha256(b"bigpool-bundle/1\n")
    h.update(struct.pack(">Q", len(env)))
    h.update(env)
    h.update(struct.pack(">Q", len(code)))
    h.update(code)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifests: storing, reading, and the wire


def _manifest(bundle: Bundle) -> bytes:
    return json.dumps(
        {
            "format": _FORMAT,
            "digest": bundle.digest,
            "python": bundle.python,
            "distributions": [list(d) for d in bundle.distributions],
            "modules": list(bundle.modules),
            "size": len(bundle.code),
        },
        sort_keys=True,
        indent=1,
    ).encode("utf-8")


def _from_manifest(raw: bytes, code: bytes, where: str) -> Bundle:
    """The bundle described by manifest ``raw`` with ``code``, verified; ValueError if not."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: bad bundle manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: bad bundle manifest: not an object")
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{where}: unknown bundle format {manifest.get('format')!r}")
    digest = manifest.get("digest")
    python = manifest.get("python")
    dists = manifest.get("distributions")
    modules = manifest.get("modules")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"{where}: bad bundle digest {digest!r}")
    if not isinstance(python, str):
        raise ValueError(f"{where}: bad python version {python!r}")
    if not isinstance(dists, list) or not all(
        isinstance(d, list) and len(d) == 2 and all(isinstance(s, str) for s in d) for d in dists
    ):
        raise ValueError(f"{where}: bad distribution list")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{where}: bad module list")
    distributions = tuple((d[0], d[1]) for d in dists)
    actual = _digest(code, distributions, python)
    if actual != digest:
        raise ValueError(
            f"{where}: bundle digest mismatch: manifest says {digest}, contents hash to {actual}"
        )
    found = _zip_modules(code)
    if tuple(modules) != found:
        raise ValueError(
            f"{where}: bundle module list {modules} does not match its zip {list(found)}"
        )
    return Bundle(
        code=code, distributions=distributions, python=python, digest=digest, modules=found
    )


def bundle_store_dir() -> str:
    """The default bundle store: ``$BIGPOOL_BUNDLE_DIR`` if set, else ``bigpool/bundles`` under
    ``$XDG_CACHE_HOME`` (when set to an absolute path) or ``~/.cache``. Not created here."""
    env = os.environ.get("BIGPOOL_BUNDLE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "bigpool", "bundles")


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bundle(bundle: Bundle, directory: str | os.PathLike[str]) -> str:
    """Store ``bundle`` in ``directory`` as ``<hex>.zip`` plus manifest ``<hex>.json``.

    Returns the zip's path. Each file is written atomically (temporary file, fsync, rename) with
    mode 0600; the zip goes first, so a manifest present means the bundle is complete. A missing
    ``directory`` is created with mode 0700 (an existing one is left as it is). Idempotent: a
    bundle already stored is not written again.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    zip_path = os.path.join(directory, bundle.hexdigest + ".zip")
    manifest_path = os.path.join(directory, bundle.hexdigest + ".json")
    if not os.path.exists(zip_path):
        _atomic_write(zip_path, bundle.code)
    if not os.path.exists(manifest_path):
        _atomic_write(manifest_path, _manifest(bundle))
    return zip_path


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a stored bundle back from its zip's path (or its manifest's), verified.

    Raises ValueError if the digest recomputed from the files differs from the manifest's or the
    file name's ("digest mismatch"), or if the manifest is malformed; OSError if a file is missing.
    """
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    if ext not in (".zip", ".json"):
        raise ValueError(f"{path}: not a stored bundle (expected <digest>.zip or <digest>.json)")
    with open(stem + ".zip", "rb") as f:
        code = f.read()
    with open(stem + ".json", "rb") as f:
        raw = f.read()
    bundle = _from_manifest(raw, code, stem + ".zip")
    name = os.path.basename(stem)
    if _HEX_RE.fullmatch(name) and name != bundle.hexdigest:
        raise ValueError(
            f"{path}: bundle digest mismatch: file name says sha256:{name}, "
            f"manifest says {bundle.digest}"
        )
    return bundle


def stored_digests(directory: str | os.PathLike[str]) -> list[str]:
    """The digests (``"sha256:<hex>"``, sorted) of the complete bundles stored in ``directory``
    (both zip and manifest present); an empty list if it does not exist. Not verified."""
    try:
        names = set(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext == ".json" and _HEX_RE.fullmatch(stem) and stem + ".zip" in names:
            out.append("sha256:" + stem)
    return sorted(out)


def serialize_bundle(bundle: Bundle) -> bytes:
    """One self-describing byte string: ``b"BPBUNDL1"``, the manifest's length (4 bytes, big
    endian), the manifest JSON, then the zip. :func:`deserialize_bundle` reverses it."""
    manifest = _manifest(bundle)
    return _WIRE_HEADER.pack(_WIRE_MAGIC, len(manifest)) + manifest + bundle.code


def deserialize_bundle(data: bytes) -> Bundle:
    """The bundle in ``data`` (from :func:`serialize_bundle`), verified.

    Raises ValueError if ``data`` is not a serialized bundle, is truncated, or its contents do not
    hash to its digest ("digest mismatch").
    """
    data = bytes(data)
    if len(data) < _WIRE_HEADER.size:
        raise ValueError("not a serialized bundle: too short")
    magic, length = _WIRE_HEADER.unpack_from(data)
    if magic != _WIRE_MAGIC:
        raise ValueError(f"not a serialized bundle: bad magic {magic!r}")
    start = _WIRE_HEADER.size
    if len(data) < start + length:
        raise ValueError("serialized bundle truncated")
    return _from_manifest(data[start : start + length], data[start + length :], "serialized bundle")
