"""py-spy, run as a subprocess: CPU profiles and stack dumps of Python processes by pid.

Used by the Supervisor on each machine and by the debug endpoint on the driver. Several
processes are sampled at once (one py-spy each), so a profile of a machine and its worker
processes covers the same seconds.

Folded stacks ("collapsed", one ``frame;frame;...;leaf count`` line per stack, root first) are
the exchange format. :func:`record_processes` puts a first frame ``process PID:"ROLE"`` on each
line, as ``py-spy record --subprocesses`` does, and adds ``# ``-prefixed note lines for
processes that could not be profiled; :func:`bigpool.debug.pprof.parse_folded` reads both.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["PTRACE_HINT", "PYSPY_ENV", "PySpyError", "dump_processes", "pyspy_path", "record", "record_processes"]

PTRACE_HINT = (
    "py-spy needs ptrace rights over the process: run as root, or grant CAP_SYS_PTRACE "
    "(docker run --cap-add SYS_PTRACE; setcap cap_sys_ptrace+ep on the py-spy binary), or "
    "allow tracing of non-child processes with sysctl kernel.yama.ptrace_scope=0"
)
# Names the py-spy executable to run (a copy with capabilities set, say); else PATH, then the
# directory of this Python.
PYSPY_ENV = "BIGPOOL_PYSPY"
# Samples per second; the pprof period is derived from it.
SAMPLE_RATE = 100
# Slack on top of a recording's duration before py-spy is presumed stuck and killed.
RECORD_SLACK_SECONDS = 30.0
DUMP_TIMEOUT_SECONDS = 30.0


class PySpyError(RuntimeError):
    """py-spy failed (not installed, no ptrace rights, not a Python process, ...).

    The message says which pid and why; for a permissions failure it also says how to grant
    the rights (:data:`PTRACE_HINT`).
    """

    def __init__(self, pid: int, what: str, detail: str) -> None:
        self.pid = pid
        self.what = what
        self.detail = detail
        super().__init__(f"py-spy {what} of pid {pid} failed: {detail}")

    def __reduce__(self) -> tuple[type[PySpyError], tuple[int, str, str]]:
        return (type(self), (self.pid, self.what, self.detail))  # travels from machines whole


def pyspy_path() -> str:
    """The py-spy executable: ``$BIGPOOL_PYSPY``, else on ``PATH``, else beside this Python
    (a virtualenv's bin). ``FileNotFoundError`` saying so when there is none."""
    configured = os.environ.get(PYSPY_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            raise FileNotFoundError(f"${PYSPY_ENV} names {configured!r}, not an executable")
        return configured
    found = shutil.which("py-spy")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(beside):
        return beside
    raise FileNotFoundError("py-spy is not installed on this host (pip install py-spy)")


def _explain(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    # py-spy prints "Error: ..." then a Rust backtrace: keep the error and its causes.
    kept: list[str] = []
    for line in lines:
        if line.startswith("Stack backtrace"):
            break
        if not line.startswith("py-spy>"):
            kept.append(line.strip())
    message = " ".join(kept) or "no error message"
    lowered = message.lower()
    if "permission" in lowered or "ptrace" in lowered or "operation not permitted" in lowered:
        message += f" -- {PTRACE_HINT}"
    return message


async def _run(args: list[str], timeout: float) -> tuple[int, str, str]:
    env = dict(os.environ, RUST_BACKTRACE="0")
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await asyncio.shield(proc.wait())
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


async def record(pid: int, seconds: float, *, rate: int = SAMPLE_RATE) -> str:
    """Sample ``pid`` for ``seconds`` (rounded up to whole seconds, as py-spy counts them);
    its folded stacks, without a process frame.

    Idle threads are left out, so a process that waited the whole time yields no lines. A
    process that exits part way yields what was sampled until then. Raises
    :class:`PySpyError` if py-spy cannot attach (its message says why), ``FileNotFoundError``
    without py-spy. Cancelling kills py-spy.
    """
    duration = max(1, math.ceil(seconds))
    with tempfile.TemporaryDirectory(prefix="bigpool-pyspy-") as tmp:
        out = os.path.join(tmp, "profile.txt")
        code, _, stderr = await _run(
            [pyspy_path(), "record", "--pid", str(pid), "--duration", str(duration),
             "--rate", str(rate), "--format", "raw", "--full-filenames", "--nonblocking",
             "--output", out],
            timeout=duration + RECORD_SLACK_SECONDS,
        )
        if code != 0 or not os.path.exists(out):
            raise PySpyError(pid, "record", _explain(stderr))
        with open(out, encoding="utf-8", errors="replace") as f:
            return f.read()


async def dump(pid: int) -> str:
    """The current stack of every thread of ``pid`` (``py-spy dump``), as text."""
    code, stdout, stderr = await _run(
        [pyspy_path(), "dump", "--pid", str(pid), "--nonblocking"], timeout=DUMP_TIMEOUT_SECONDS
    )
    if code != 0:
        raise PySpyError(pid, "dump", _explain(stderr or stdout))
    return stdout


def _process_frame(pid: int, role: str) -> str:
    return f'process {pid}:"{role}"'


async def record_processes(processes: Sequence[tuple[int, str]], seconds: float) -> str:
    """Record every ``(pid, role)`` at the same time; their folded stacks, each line starting
    with a ``process PID:"ROLE"`` frame, then a ``# `` note line per process that failed.

    Never raises for one process's failure (it becomes a note); ``FileNotFoundError`` if
    py-spy is missing.
    """
    pyspy_path()
    results = await asyncio.gather(
        *(record(pid, seconds) for pid, _ in processes), return_exceptions=True
    )
    lines: list[str] = []
    notes: list[str] = []
    for (pid, role), result in zip(processes, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            notes.append(f"# {role} pid {pid} not profiled: {result}")
            continue
        prefix = _process_frame(pid, role)
        lines.extend(f"{prefix};{line}" for line in result.splitlines() if line.strip())
    return "".join(f"{line}\n" for line in [*lines, *notes])


async def dump_processes(processes: Sequence[tuple[int, str]]) -> str:
    """``py-spy dump`` of every ``(pid, role)`` at once, each under a ``process PID (ROLE)``
    heading; a process that cannot be dumped shows why instead."""
    pyspy_path()
    results = await asyncio.gather(*(dump(pid) for pid, _ in processes), return_exceptions=True)
    parts = []
    for (pid, role), result in zip(processes, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        body = f"error: {result}\n" if isinstance(result, BaseException) else result
        parts.append(f"--- process {pid} ({role}) ---\n{body}")
    return "\n".join(parts)
