"""What the debug endpoint gathers from the cluster: status, expvars, profiles, stack dumps.

Every function here is a coroutine run on B's event loop. Machines are asked at the same time
(one call each, through their Supervisor), and a machine that fails or dies meanwhile leaves
a note or an error entry instead of failing or stalling the whole: the answer covers the
machines that answered.

Machines of an in-process system (the ``test`` system) share the driver's process: their
Supervisor is asked to leave its own process out (``"self": False``), since the driver's own
profile already covers it, so no process is counted twice.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from .. import pyspy
from ..machine import State
from ..supervisor import expvars_snapshot, heap_text
from .pprof import Profile

if TYPE_CHECKING:
    from ..machine import B, Machine

__all__ = [
    "DRIVER",
    "MAX_SECONDS",
    "ProfileFailedError",
    "UnknownMachineError",
    "cpu_profile",
    "expvars",
    "heap",
    "select",
    "status",
    "threads",
]

T = TypeVar("T")

# The name the driver goes by where a machine address would stand (labels, ?machine=).
DRIVER = "driver"
# Longest CPU profile the endpoint takes (the Supervisor's own limit).
MAX_SECONDS = 600
# How long one machine may take to report its memory, disk, load or expvars.
INFO_TIMEOUT = 5.0
# Added to a profile's duration before a machine that has not answered is given up.
PROFILE_SLACK = 60.0

_started = time.time()


class ProfileFailedError(RuntimeError):
    """No process of those asked for could be profiled; ``notes`` say why, for each."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes
        super().__init__("no process could be profiled:\n" + "\n".join(notes))


class UnknownMachineError(LookupError):
    """``?machine=`` named no machine of this cluster; the message lists the known ones."""


def _normal(addr: str) -> str:
    for scheme in ("https://", "http://"):
        if addr.startswith(scheme):
            addr = addr[len(scheme):]
    return addr.rstrip("/")


def select(b: B, machine: str | None) -> tuple[bool, list[Machine]]:
    """Whom a request covers: (the driver?, these machines). ``None`` means everyone; an
    address (with or without ``https://`` and the trailing slash) one machine; ``"driver"``
    the driver alone. Raises :class:`UnknownMachineError` for any other name."""
    machines = sorted(b.machines(), key=lambda m: m.addr)
    if machine is None:
        return True, machines
    if machine == DRIVER:
        return True, []
    wanted = _normal(machine)
    for m in machines:
        if _normal(m.addr) == wanted:
            return False, [m]
    known = ", ".join([DRIVER, *(m.addr for m in machines)])
    raise UnknownMachineError(f"no machine {machine!r} in this cluster; known: {known}")


def _in_driver_process(m: Machine) -> bool:
    return m.pid == os.getpid()


async def _gather(calls: dict[str, Coroutine[Any, Any, T]]) -> dict[str, T | BaseException]:
    # Cancelling the caller cancels the gather itself (and every call); a single call's
    # failure, cancellation included, is that call's result.
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    return dict(zip(calls, results, strict=True))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# profiles ----------------------------------------------------------------------------------


async def _machine_cpu_profile(m: Machine, seconds: int) -> str:
    request = {"seconds": seconds, "self": not _in_driver_process(m)}
    reader = await m.call_async("Supervisor.cpu_profile", request, timeout=seconds + PROFILE_SLACK)
    data: bytes = await reader.read() if hasattr(reader, "read") else bytes(reader)
    return data.decode("utf-8", "replace")


async def cpu_profile(b: B, seconds: int, machine: str | None = None) -> Profile:
    """A CPU profile of ``seconds`` of the cluster (or of ``machine``), merged.

    The driver and every RUNNING machine with its worker processes are sampled over the same
    seconds. Samples carry ``machine`` (an address, or ``"driver"``), ``role`` and ``pid``
    labels. A machine that is not running, fails or dies part way adds a note and no
    samples; the others are still there. Raises :class:`ProfileFailedError` when nobody
    could be profiled (py-spy lacking ptrace rights everywhere, say), with every reason.
    """
    if not 1 <= seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be from 1 to {MAX_SECONDS}, not {seconds}")
    include_driver, machines = select(b, machine)
    profile = Profile(
        period_ns=1_000_000_000 // pyspy.SAMPLE_RATE,
        duration_ns=seconds * 1_000_000_000,
        time_ns=time.time_ns(),
    )
    calls: dict[str, Coroutine[Any, Any, str]] = {}
    for m in machines:
        if m.state is State.RUNNING:
            calls[m.addr] = _machine_cpu_profile(m, seconds)
        else:
            profile.notes.append(f"{m.addr}: not profiled: machine is {m.state.name}")
    if include_driver:
        calls[DRIVER] = pyspy.record_processes([(os.getpid(), DRIVER)], seconds)
    results = await _gather(calls)
    answered = 0
    for name, result in results.items():
        if isinstance(result, BaseException):
            state = ""
            lost = next((x for x in machines if x.addr == name), None)
            if lost is not None and lost.state is not State.RUNNING:
                state = f" (machine is {lost.state.name})"
            profile.notes.append(f"{name}: profile lost{state}: {_describe(result)}")
            continue
        profile.add_folded(result, {"machine": name})
        # Nothing at all is an idle process; only notes, processes py-spy could not attach to.
        lines = [line for line in result.splitlines() if line.strip()]
        if not lines or any(not line.startswith("#") for line in lines):
            answered += 1
    if not answered:
        raise ProfileFailedError(profile.notes or ["nothing to profile: no machine is running"])
    return profile


async def _machine_text(m: Machine, method: str, request: Any) -> str:
    text = await m.call_async(method, request, timeout=pyspy.DUMP_TIMEOUT_SECONDS + 10)
    return str(text)


async def threads(b: B, machine: str | None = None) -> str:
    """A stack dump (py-spy dump) of every thread of every process of the cluster (or of
    ``machine``), one section per machine; a machine that cannot answer says why."""
    include_driver, machines = select(b, machine)
    calls: dict[str, Coroutine[Any, Any, str]] = {}
    if include_driver:
        calls[DRIVER] = pyspy.dump(os.getpid())
    for m in machines:
        if m.state is State.RUNNING:
            request = {"name": "threads", "self": not _in_driver_process(m)}
            calls[m.addr] = _machine_text(m, "Supervisor.profile", request)
    results = await _gather(calls)
    sections = []
    for m in machines:
        if m.addr not in calls:
            sections.append(f"=== {m.addr} ===\nnot dumped: machine is {m.state.name}\n")
    for name, result in results.items():
        body = f"error: {_describe(result)}\n" if isinstance(result, BaseException) else result
        if not body.strip() and name != DRIVER:
            body = "(the machine runs in the driver's process: see the driver's dump)\n"
        sections.append(f"=== {name} ===\n{body}")
    return "\n".join(sections)


async def heap(b: B, machine: str | None = None) -> str | None:
    """tracemalloc's top allocation sites on each process that traces them (the driver, and
    machines started with ``PYTHONTRACEMALLOC``); ``None`` if none does."""
    include_driver, machines = select(b, machine)
    sections = []
    if include_driver and tracemalloc.is_tracing():
        text = await asyncio.get_running_loop().run_in_executor(None, heap_text)
        sections.append(f"=== {DRIVER} ===\n{text}\n")
    tracing = await _tracing_machines(machines)
    dumps = await _gather({m.addr: _machine_text(m, "Supervisor.profile", "heap") for m in tracing})
    for name, result in dumps.items():
        body = f"error: {_describe(result)}" if isinstance(result, BaseException) else result
        sections.append(f"=== {name} ===\n{body}\n")
    return "\n".join(sections) if sections else None


async def _tracing_machines(machines: list[Machine]) -> list[Machine]:
    running = [m for m in machines if m.state is State.RUNNING and not _in_driver_process(m)]
    names = await _gather({m.addr: m.call_async("Supervisor.profiles", timeout=INFO_TIMEOUT)
                           for m in running})
    return [m for m in running if _lists(names.get(m.addr), "heap")]


def _lists(value: object, name: str) -> bool:
    return isinstance(value, list) and name in value


async def heap_available(b: B) -> list[str]:
    """Who can give a heap profile now: ``"driver"`` and machine addresses."""
    who = [DRIVER] if tracemalloc.is_tracing() else []
    machines = sorted(b.machines(), key=lambda m: m.addr)
    who.extend(m.addr for m in await _tracing_machines(machines))
    return who


# status and expvars --------------------------------------------------------------------------


async def _machine_info(m: Machine) -> dict[str, Any]:
    calls = {
        "mem": m.call_async("Supervisor.mem_info", timeout=INFO_TIMEOUT),
        "disk": m.call_async("Supervisor.disk_info", timeout=INFO_TIMEOUT),
        "load": m.call_async("Supervisor.load_info", timeout=INFO_TIMEOUT),
    }
    results = await _gather(calls)
    info: dict[str, Any] = {}
    errors = []
    for key, result in results.items():
        if isinstance(result, BaseException):
            errors.append(f"{key}: {_describe(result)}")
        else:
            info[key] = result
    if errors:
        info["info_errors"] = errors
    return info


def _machine_entry(m: Machine, now: float) -> dict[str, Any]:
    err = m.err()
    next_keepalive = m.next_keepalive
    return {
        "addr": m.addr,
        "state": m.state.name,
        "owned": m.owned,
        "pid": m.pid,
        "maxprocs": m.maxprocs,
        "uptime_seconds": None if m.started_at is None else now - m.started_at,
        "calls_in_flight": m.calls_in_flight,
        "keepalive_reply_ms": [round(t * 1000, 3) for t in m.keepalive_reply_times()],
        "next_keepalive_in_seconds": None if next_keepalive is None else next_keepalive - now,
        "error": None if err is None else _describe(err),
    }


def _driver_entry(b: B) -> dict[str, Any]:
    process = psutil.Process()
    return {
        "pid": os.getpid(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "system": b.system.name,
        "uptime_seconds": time.time() - _started,
        "rss": process.memory_info().rss,
        "threads": process.num_threads(),
        "cmdline": list(sys.argv),
    }


async def status(b: B) -> dict[str, Any]:
    """The cluster at a glance, JSON-ready: ``driver``, ``machines`` (every machine this B
    knows, sorted by address, with state and error; RUNNING ones also with ``mem``,
    ``disk`` and ``load``), and what each status provider reports under its name (the pool's
    task counts under ``"pool"``)."""
    now = time.time()
    machines = sorted(b.machines(), key=lambda m: m.addr)
    entries = [_machine_entry(m, now) for m in machines]
    running = {m.addr: _machine_info(m) for m in machines if m.state is State.RUNNING}
    infos = await _gather(running)
    for entry in entries:
        info = infos.get(entry["addr"])
        if isinstance(info, BaseException):
            entry["info_errors"] = [_describe(info)]
        elif info is not None:
            entry.update(info)
    result: dict[str, Any] = {"driver": _driver_entry(b), "machines": entries}
    for name, provider in b.status_providers().items():
        try:
            result[name] = provider()
        except Exception as exc:
            result[name] = {"error": _describe(exc)}
    return result


async def expvars(b: B) -> dict[str, Any]:
    """The driver's expvars (what :func:`bigpool.expvar_add` and friends published here, and
    ``cmdline``, ``pid``, ``uptime_seconds``), with each owned machine's under ``machines``
    (an ``{"error": ...}`` for a machine that did not answer)."""
    out: dict[str, Any] = dict(expvars_snapshot())
    out.update({"cmdline": list(sys.argv), "pid": os.getpid(),
                "uptime_seconds": time.time() - _started})
    owned = [m for m in sorted(b.machines(), key=lambda m: m.addr)
             if m.owned and m.state is State.RUNNING]
    results = await _gather({m.addr: m.call_async("Supervisor.expvars", timeout=INFO_TIMEOUT)
                             for m in owned})
    out["machines"] = {
        addr: {"error": _describe(r)} if isinstance(r, BaseException) else r
        for addr, r in results.items()
    }
    return out

