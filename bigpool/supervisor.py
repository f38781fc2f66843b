"""The Supervisor: the service every machine runs, through which the driver manages it.

Its methods mirror Bigmachine's supervisor: ping, getpid, info, setargs, setenv, setbinary,
getbinary, exec, keepalive, mem_info, disk_info, load_info, expvars, cpu_profile, profile,
profiles, register, shutdown. The machine-side runtime it acts on (the server, the watchdog,
the process) is :class:`bigpool.node.MachineRuntime`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import dill
import psutil

from .h2rpc import StreamReader

if TYPE_CHECKING:
    from .node import MachineRuntime

__all__ = ["Supervisor", "expvar_add", "expvar_set", "expvars_snapshot"]

# Longest keepalive a driver may ask for: a driver that vanishes is noticed within this.
MAX_KEEPALIVE = 3600.0
# Longest CPU profile one call may ask for.
MAX_PROFILE_SECONDS = 600.0

_expvars: dict[str, Any] = {}
_expvars_lock = threading.Lock()


def expvar_add(name: str, delta: float = 1) -> None:
    """Add ``delta`` to the counter ``name`` (published by ``Supervisor.expvars``)."""
    with _expvars_lock:
        _expvars[name] = _expvars.get(name, 0) + delta


def expvar_set(name: str, value: Any) -> None:
    """Set the gauge ``name`` to ``value`` (any JSON-like value)."""
    with _expvars_lock:
        _expvars[name] = value


def expvars_snapshot() -> dict[str, Any]:
    with _expvars_lock:
        return dict(_expvars)


class Supervisor:
    """Manages its machine on the driver's behalf. Registered as ``"Supervisor"``."""

    def __init__(self, runtime: MachineRuntime) -> None:
        self._runtime = runtime
        self._started = time.time()

    def ping(self, seq: int = 0) -> int:
        """Reply at once with ``seq``."""
        return seq

    def getpid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        """What runs here: Python, platform, the running bundle's digest and the stored ones."""
        runtime = self._runtime
        return {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": sys.platform,
            "machine": platform.machine(),
            "hostname": platform.node(),
            "pid": os.getpid(),
            "maxprocs": runtime.maxprocs,
            "digest": runtime.digest,
            "bundles": runtime.stored_bundles(),
            "started": self._started,
        }

    def setargs(self, args: Sequence[str]) -> None:
        """Set ``sys.argv`` here and for an exec'd image."""
        if not isinstance(args, list | tuple) or not all(isinstance(a, str) for a in args):
            raise TypeError("setargs takes a list of strings")
        self._runtime.set_args(list(args))

    def setenv(self, environ: Sequence[str]) -> None:
        """Add ``KEY=VALUE`` entries to the machine's environment (later ones win)."""
        if not isinstance(environ, list | tuple):
            raise TypeError("setenv takes a list of 'KEY=VALUE' strings")
        pairs = []
        for item in environ:
            if not isinstance(item, str) or "=" not in item or item.startswith("="):
                raise ValueError(f"environment entry {item!r} is not of the form KEY=VALUE")
            key, _, value = item.partition("=")
            pairs.append((key, value))
        self._runtime.set_environ(pairs)

    async def setbinary(self, reader: StreamReader) -> str:
        """Receive a code bundle (streamed) and store it; returns its digest.

        Kept apart from :meth:`exec` so that the upload and the exec can have different
        timeouts, as in Bigmachine.
        """
        return await self._runtime.store_bundle(reader)

    def getbinary(self) -> Iterator[bytes]:
        """The bundle last stored by :meth:`setbinary` (else the running one), streamed."""
        path = self._runtime.last_bundle_path or self._runtime.running_bundle_path()
        if path is None:
            raise FileNotFoundError("no bundle has been uploaded to this machine")
        from .bundle import read_bundle, serialize_bundle

        return iter([serialize_bundle(read_bundle(path))])

    async def exec(self, digest: str) -> None:
        """Replace this process with a Python running the stored bundle ``digest``.

        Replies first; the exec follows a moment later, so the caller sees the connection drop.
        """
        self._runtime.check_bundle(digest)
        self._runtime.exec_bundle(digest)

    def keepalive(self, next_seconds: float) -> dict[str, Any]:
        """Stay alive for ``next_seconds`` more; the machine exits if no keepalive follows."""
        try:
            requested = float(next_seconds)
        except (TypeError, ValueError):
            raise TypeError("keepalive takes a number of seconds") from None
        if not requested > 0:
            raise ValueError(f"keepalive must be positive, not {requested}")
        accepted = min(requested, MAX_KEEPALIVE)
        self._runtime.extend_deadline(accepted)
        return {"next": accepted, "healthy": True}

    def mem_info(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(psutil.virtual_memory()._asdict())
        info["process_rss"] = psutil.Process().memory_info().rss
        return info

    def disk_info(self) -> dict[str, Any]:
        return dict(psutil.disk_usage(tempfile.gettempdir())._asdict())

    def load_info(self) -> dict[str, Any]:
        one, five, fifteen = psutil.getloadavg()
        return {"load1": one, "load5": five, "load15": fifteen, "cpus": psutil.cpu_count()}

    def expvars(self) -> dict[str, Any]:
        """This machine's published counters and gauges."""
        snapshot = expvars_snapshot()
        snapshot["uptime_seconds"] = time.time() - self._started
        snapshot["services"] = sorted(self._runtime.server.services)
        return snapshot

    def profiles(self) -> list[str]:
        """The profile names :meth:`profile` accepts here."""
        names = ["threads"]
        if tracemalloc.is_tracing():
            names.append("heap")
        return names

    def profile(self, name: str) -> str:
        """A named profile as text: ``threads`` (a py-spy dump of every thread) or ``heap``."""
        if name == "threads":
            return _py_spy(["dump", "--pid", str(os.getpid())], timeout=60)
        if name == "heap":
            if not tracemalloc.is_tracing():
                raise ValueError("heap profile needs tracemalloc (PYTHONTRACEMALLOC=1)")
            stats = tracemalloc.take_snapshot().statistics("lineno")[:100]
            return "\n".join(str(s) for s in stats)
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(self.profiles())}")

    def cpu_profile(self, seconds: float = 30.0) -> Iterator[bytes]:
        """A CPU profile of this process taken with py-spy for ``seconds``, as folded stacks."""
        duration = float(seconds)
        if not 0 < duration <= MAX_PROFILE_SECONDS:
            raise ValueError(f"profile duration must be in (0, {MAX_PROFILE_SECONDS:g}] seconds")
        with tempfile.TemporaryDirectory(prefix="bigpool-prof-") as tmp:
            out = os.path.join(tmp, "profile.txt")
            _py_spy(
                ["record", "--pid", str(os.getpid()), "--duration", f"{max(1, round(duration))}",
                 "--format", "raw", "--output", out, "--nonblocking"],
                timeout=duration + 60,
            )
            with open(out, "rb") as f:
                data = f.read()
        return iter([data])

    async def register(self, registration: tuple[str, bytes]) -> None:
        """Install a service (name, dill pickle) and run its ``init(b)`` if it has one.

        Raises what unpickling or ``init`` raised; the service is then not installed.
        """
        name, payload = registration
        try:
            service = dill.loads(payload)
        except Exception as exc:
            raise ServiceUnpickleError(
                f"service {name!r} could not be unpickled on this machine: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        runtime = self._runtime
        runtime.server.register(name, service)
        init = getattr(service, "init", None)
        if callable(init):
            try:
                if inspect.iscoroutinefunction(init):
                    await init(runtime.b)
                else:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(None, init, runtime.b)
            except BaseException:
                runtime.server.unregister(name)
                raise

    def shutdown(self, delay: float = 0.0, message: str = "") -> None:
        """Exit this machine after ``delay`` seconds (replying first)."""
        self._runtime.schedule_exit(max(0.0, float(delay)), message)


class ServiceUnpickleError(RuntimeError):
    """A service's pickle could not be loaded on the machine (a missing module, say)."""


def _py_spy(args: list[str], timeout: float) -> str:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        raise FileNotFoundError("py-spy is not installed on this machine (pip install py-spy)")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        if "ermission" in message or "ptrace" in message.lower():
            message += (
                " -- py-spy needs ptrace rights: run as root, grant CAP_SYS_PTRACE, or set "
                "kernel.yama.ptrace_scope=0 (sysctl)"
            )
        raise RuntimeError(f"py-spy {args[0]} failed: {message}")
    return proc.stdout
