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
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import dill
import psutil

from . import pyspy
from .expvar import expvar_add, expvar_set, expvars_snapshot
from .h2rpc import StreamReader

if TYPE_CHECKING:
    from .node import MachineRuntime

__all__ = ["Supervisor", "expvar_add", "expvar_set", "expvars_snapshot"]

# Longest keepalive a driver may ask for: a driver that vanishes is noticed within this.
MAX_KEEPALIVE = 3600.0
# Longest CPU profile one call may ask for.
MAX_PROFILE_SECONDS = 600.0


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``module.Class`` of an event loop (``uvloop.Loop``, or asyncio's
    ``asyncio.unix_events._UnixSelectorEventLoop``)."""
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


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
        """What runs here: Python, platform, the running bundle's digest and the stored ones,
        the event loop's class."""
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
            "event_loop": _loop_name(runtime.loop),
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

    async def expvars(self) -> dict[str, Any]:
        """This machine's published counters and gauges (:func:`expvar_add`,
        :func:`expvar_set`), its uptime and services, and under a service's name what the
        service reports through an optional ``_bigpool_expvars()`` method (the pool's worker
        service: its queue, workers and restarts). Runs on the machine's event loop, where
        services keep their state."""
        snapshot = expvars_snapshot()
        snapshot["uptime_seconds"] = time.time() - self._started
        services = dict(self._runtime.server.services)
        snapshot["services"] = sorted(services)
        for name, service in services.items():
            report = getattr(service, "_bigpool_expvars", None)
            if callable(report):
                try:
                    snapshot[name] = report()
                except Exception as exc:
                    snapshot[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return snapshot

    def profiles(self) -> list[str]:
        """The profile names :meth:`profile` accepts here."""
        names = ["threads"]
        if tracemalloc.is_tracing():
            names.append("heap")
        return names

    def processes(self, include_self: bool = True) -> list[tuple[int, str]]:
        """The ``(pid, role)`` of the processes a profile of this machine covers: its own
        (role ``"machine"``, unless ``include_self`` is false) and those its services run
        (role ``"worker"``: the pool's worker processes), as services report them through
        an optional ``_bigpool_pids()`` method."""
        found: list[tuple[int, str]] = [(os.getpid(), "machine")] if include_self else []
        for service in list(self._runtime.server.services.values()):
            pids = getattr(service, "_bigpool_pids", None)
            if callable(pids):
                found.extend((int(pid), "worker") for pid in pids())
        return found

    async def profile(self, request: str | dict[str, Any]) -> str:
        """A named profile as text: ``threads`` (a py-spy dump of every thread of this
        machine's process and of its worker processes) or ``heap`` (tracemalloc's top 100).

        ``request`` is the name, or ``{"name": ..., "self": bool}``; ``self=False`` leaves this
        process out of ``threads`` (the driver does so for machines that live in its own
        process). Raises ``ValueError`` for an unknown name or a heap profile without
        tracemalloc, :class:`bigpool.pyspy.PySpyError` if py-spy cannot attach.
        """
        name, include_self = _profile_request(request)
        if name == "threads":
            processes = self.processes(include_self)
            if not processes:
                return ""
            if len(processes) == 1:
                return await pyspy.dump(processes[0][0])
            return await pyspy.dump_processes(processes)
        if name == "heap":
            if not tracemalloc.is_tracing():
                raise ValueError("heap profile needs tracemalloc (PYTHONTRACEMALLOC=1)")
            # A snapshot of a big heap takes a while: not on the loop that answers keepalives.
            return await asyncio.get_running_loop().run_in_executor(None, heap_text)
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(self.profiles())}")

    async def cpu_profile(self, request: float | dict[str, Any] = 30.0) -> Iterator[bytes]:
        """A CPU profile of this machine taken with py-spy, as folded stacks (streamed).

        ``request`` is the duration in seconds, or ``{"seconds": ..., "self": bool}``. The
        machine's process and its worker processes (:meth:`processes`) are sampled at the
        same time; each line starts with a ``process PID:"ROLE"`` frame, and a process that
        could not be profiled leaves a ``# `` note line instead of failing the whole. Raises
        ``ValueError`` for a duration outside (0, MAX_PROFILE_SECONDS].
        """
        if isinstance(request, dict):
            seconds = request.get("seconds", 30.0)
            include_self = bool(request.get("self", True))
        else:
            seconds, include_self = request, True
        try:
            duration = float(seconds)
        except (TypeError, ValueError):
            raise TypeError(f"profile duration must be a number of seconds, not {seconds!r}") from None
        if not 0 < duration <= MAX_PROFILE_SECONDS:
            raise ValueError(f"profile duration must be in (0, {MAX_PROFILE_SECONDS:g}] seconds")
        folded = await pyspy.record_processes(self.processes(include_self), duration)
        return iter([folded.encode("utf-8")])

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


def heap_text(limit: int = 100) -> str:
    """tracemalloc's top ``limit`` allocation sites of this process, one per line."""
    stats = tracemalloc.take_snapshot().statistics("lineno")[:limit]
    return "\n".join(str(s) for s in stats)


def _profile_request(request: str | dict[str, Any]) -> tuple[str, bool]:
    if isinstance(request, dict):
        name = request.get("name")
        include_self = bool(request.get("self", True))
    else:
        name, include_self = request, True
    if not isinstance(name, str):
        raise TypeError(f"profile takes a profile name, not {name!r}")
    return name, include_self
