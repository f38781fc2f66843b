"""Machine side of EC2 bundles: one virtual environment per driver environment.

A bundle lists the driver's installed distributions. Before the machine execs into a bundle it
makes (once) a virtual environment keyed by :func:`environment_key` of that list and the
Python version, under ``$BIGPOOL_VENV_DIR``. The new environment is layered over the machine's
base environment (the one the boot script made, which holds bigpool's own dependencies): a
``.pth`` file adds the base site directories *after* the venv's own, and only distributions
the base lacks at the driver's exact version are installed, with
``pip install --no-deps --ignore-installed name==version`` (extra pip arguments from
``$BIGPOOL_PIP_ARGS``, a JSON list, for a private index or a local wheel directory).

``bigpool`` is never installed from an index: the driver's own copy arrives as the bootstrap zip
(and in the bundle, for a development checkout), so an unpublished bigpool works. A distribution
pip cannot find (a tool installed from a local path on the driver, say) is reported on stderr
and left out; the machine runs without it.

A venv is complete when its ``.bigpool-ready`` marker exists; an incomplete one is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from collections.abc import Iterable, Sequence

__all__ = [
    "ENV_PIP_ARGS",
    "ENV_VENV_BASE",
    "ENV_VENV_DIR",
    "environment_key",
    "missing_distributions",
    "prepare_venv",
    "venv_python",
]

ENV_VENV_DIR = "BIGPOOL_VENV_DIR"
ENV_VENV_BASE = "BIGPOOL_VENV_BASE"
ENV_PIP_ARGS = "BIGPOOL_PIP_ARGS"

# Never installed from an index: bigpool travels with the driver; pip belongs to the base.
NEVER_INSTALLED = frozenset({"bigpool", "pip"})
READY_MARKER = ".bigpool-ready"
PIP_TIMEOUT = 1800.0


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment_key(distributions: Iterable[tuple[str, str]], python: str) -> str:
    """A short stable name for an environment: the same distributions on the same Python
    give the same key, so drivers whose code differs but whose environment does not share one
    venv."""
    text = json.dumps({"python": python, "distributions": sorted(map(list, distributions))})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def base_site_dirs() -> list[str]:
    """The base environment's site directories: ``$BIGPOOL_VENV_BASE`` or this Python's."""
    env = os.environ.get(ENV_VENV_BASE)
    if env:
        return [p for p in env.split(os.pathsep) if p]
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def missing_distributions(
    distributions: Iterable[tuple[str, str]], base_dirs: Sequence[str]
) -> list[tuple[str, str]]:
    """The ``(name, version)`` pairs the base directories do not hold at that exact version,
    less those never installed (bigpool, pip)."""
    have: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=list(base_dirs)):
        try:
            have.setdefault(_normalise(dist.metadata["Name"]), dist.version)
        except Exception:
            continue
    return [
        (name, version)
        for name, version in distributions
        if _normalise(name) not in NEVER_INSTALLED and have.get(_normalise(name)) != version
    ]


def venv_python(directory: str) -> str:
    return os.path.join(directory, "bin", "python")


def _site_packages(directory: str) -> str:
    major, minor = sys.version_info[:2]
    return os.path.join(directory, "lib", f"python{major}.{minor}", "site-packages")


def _pip(python: str, requirements: Sequence[str], pip_args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
         "--ignore-installed", "--disable-pip-version-check", "--no-input", "-q",
         *pip_args, *requirements],
        capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False,
    )


def prepare_venv(
    distributions: Sequence[tuple[str, str]],
    python_version: str,
    root: str,
    *,
    pip_args: Sequence[str] | None = None,
) -> str:
    """Make (or reuse) the venv for this environment under ``root``; its Python's path.

    Idempotent: a complete venv is reused as it is. Distributions pip cannot install are
    reported on stderr and skipped (see the module docstring); what was installed is listed in
    the venv's ``bigpool-installed.json``.
    """
    if pip_args is None:
        pip_args = json.loads(os.environ.get(ENV_PIP_ARGS) or "[]")
    key = environment_key(distributions, python_version)
    directory = os.path.join(root, key)
    python = venv_python(directory)
    if os.path.exists(os.path.join(directory, READY_MARKER)):
        return python
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(root, mode=0o700, exist_ok=True)
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(directory)
    base = base_site_dirs()
    with open(os.path.join(_site_packages(directory), "_bigpool_base.pth"), "w") as f:
        f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in base) + "\n")
    missing = missing_distributions(distributions, base)
    failed: list[str] = []
    if missing:
        requirements = [f"{name}=={version}" for name, version in missing]
        if _pip(python, requirements, pip_args).returncode != 0:
            for requirement in requirements:  # find out which ones pip cannot install
                result = _pip(python, [requirement], pip_args)
                if result.returncode != 0:
                    failed.append(requirement)
                    tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
                    print(f"bigpool machine: could not install {requirement}: {' '.join(tail)}",
                          file=sys.stderr, flush=True)
    with open(os.path.join(directory, "bigpool-installed.json"), "w") as f:
        json.dump({"installed": [f"{n}=={v}" for n, v in missing if f"{n}=={v}" not in failed],
                   "failed": failed}, f, indent=1)
    with open(os.path.join(directory, READY_MARKER), "w") as f:
        f.write(key + "\n")
    return python
