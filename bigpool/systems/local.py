"""The local system: each machine is a Python process on this host (the default system).

Machines share the driver's files and Python, so no code upload is needed (unless
``exec_bundle=True``, which exercises the full upload-and-exec path). Each machine gets a
listening socket bound by the driver (passed as a file descriptor, so there is no race for a
free port), and its own leaf certificate through a pipe. Its stdout and stderr are copied to
the driver's, line by line, prefixed with its address.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from ..h2rpc import BigpoolError, NetworkError
from ..node import (
    ENV_BUNDLE_DIR,
    ENV_CREDENTIALS_FD,
    ENV_KEEPALIVE_TIMEOUT,
    ENV_LISTEN_FD,
    ENV_MAXPROCS,
    ENV_SYSTEM,
    EXIT_NO_KEEPALIVE,
    encode_credentials,
)
from . import KeepaliveConfig

if TYPE_CHECKING:
    from ..machine import B, Machine

__all__ = ["KeepaliveExpiredError", "LocalSystem", "MachineExitedError"]

# Lines of a machine's stderr kept to explain its death.
STDERR_TAIL_LINES = 40
# How long a machine may take to exit after SIGTERM before it is killed.
TERMINATE_GRACE = 5.0


class MachineExitedError(BigpoolError):
    """A machine's process exited. Says how: exit code or signal, and its last stderr lines."""

    temporary = True

    def __init__(self, addr: str, returncode: int, stderr_tail: list[str]) -> None:
        self.addr = addr
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        if returncode < 0:
            try:
                how = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"killed by signal {-returncode}"
        else:
            how = f"exited with code {returncode}"
        tail = "".join(stderr_tail[-10:]).rstrip()
        detail = f"; last stderr lines:\n{tail}" if tail else ""
        super().__init__(f"machine {addr} {how}{detail}")
        self.addr = addr  # again: NetworkError's __init__ (in a subclass's MRO) resets it


class KeepaliveExpiredError(MachineExitedError, NetworkError):  # type: ignore[misc]
    """A machine exited because no keepalive reached it in time: the network between it and
    the driver failed (or the driver stalled). A :class:`NetworkError`, as the driver's own
    keepalive failure would be."""


@dataclass
class LocalProcess:
    """The local system's record of one machine process."""

    proc: subprocess.Popen[bytes]
    addr: str
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    threads: list[threading.Thread] = field(default_factory=list)


_output_lock = threading.Lock()
_live: weakref.WeakSet[LocalSystem] = weakref.WeakSet()


def _kill_leftovers() -> None:
    for system in list(_live):
        system.kill_all()


atexit.register(_kill_leftovers)


def _driver_path(existing: str | None) -> str:
    entries = [os.path.abspath(p or os.curdir) for p in sys.path if os.path.isdir(p or os.curdir)]
    if existing:
        entries.append(existing)
    return os.pathsep.join(dict.fromkeys(entries))


class LocalSystem:
    """Machines as local processes. ``maxprocs`` worker slots per machine (default 1)."""

    name = "local"

    def __init__(
        self,
        *,
        maxprocs: int = 1,
        keepalive: KeepaliveConfig | None = None,
        exec_bundle: bool = False,
        bundle_dir: str | None = None,
        python: str | None = None,
        boot_keepalive_timeout: float = 120.0,
    ) -> None:
        if not isinstance(maxprocs, int) or maxprocs < 1:
            raise ValueError(f"maxprocs must be a positive integer, not {maxprocs!r}")
        self._maxprocs = maxprocs
        self._keepalive = keepalive or KeepaliveConfig(period=2.0, timeout=15.0, rpc_timeout=5.0)
        self.exec_bundle = exec_bundle
        self.bundle_dir = bundle_dir
        self.python = python or sys.executable
        self.boot_keepalive_timeout = boot_keepalive_timeout
        self._b: B | None = None
        self.processes: dict[str, LocalProcess] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalSystem(maxprocs={self._maxprocs}, machines={len(self.processes)})"

    def init(self, b: B) -> None:
        self._b = b
        _live.add(self)

    def keepalive_config(self) -> KeepaliveConfig:
        return self._keepalive

    def maxprocs(self) -> int:
        return self._maxprocs

    def needs_bundle(self) -> bool:
        return self.exec_bundle

    async def start(self, b: B, count: int) -> list[Machine]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(None, self._spawn, b) for _ in range(count)]

    def _spawn(self, b: B) -> Machine:
        from ..machine import Machine

        if b.authority is None:
            raise RuntimeError("only a driver can start local machines")
        sock, host = self._listen()
        read_fd = write_fd = -1
        try:
            port = sock.getsockname()[1]
            addr = f"https://{host}:{port}/"
            credentials = b.authority.issue(f"machine {addr}", ips=[host], dns=["localhost"])
            read_fd, write_fd = os.pipe()
            os.write(write_fd, encode_credentials(credentials))
            os.close(write_fd)
            write_fd = -1
            env = dict(os.environ)
            env.update({
                ENV_LISTEN_FD: str(sock.fileno()),
                ENV_CREDENTIALS_FD: str(read_fd),
                ENV_KEEPALIVE_TIMEOUT: str(self.boot_keepalive_timeout),
                ENV_MAXPROCS: str(self._maxprocs),
                ENV_SYSTEM: self.name,
                "PYTHONUNBUFFERED": "1",
                # The driver's import path, so services pickled by reference load there too.
                "PYTHONPATH": _driver_path(env.get("PYTHONPATH")),
            })
            if self.bundle_dir:
                env[ENV_BUNDLE_DIR] = self.bundle_dir
            proc = subprocess.Popen(
                self._command(host),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(sock.fileno(), read_fd),
                env=env,
                start_new_session=True,
            )
        finally:
            sock.close()
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
        machine = Machine(addr, maxprocs=self._maxprocs)
        machine.pid = proc.pid
        record = LocalProcess(proc, addr)
        machine.system_handle = record
        with self._lock:
            self.processes[addr] = record
        assert proc.stdout is not None and proc.stderr is not None
        out = threading.Thread(
            target=self._copy, args=(proc.stdout, "stdout", record, None),
            name=f"bigpool-stdout-{port}", daemon=True,
        )
        err = threading.Thread(
            target=self._copy, args=(proc.stderr, "stderr", record, machine),
            name=f"bigpool-stderr-{port}", daemon=True,
        )
        record.threads = [out, err]
        out.start()
        err.start()
        return machine

    def _listen(self) -> tuple[socket.socket, str]:
        """A listening socket for a new machine, and the IP address the driver dials it at.

        Subclasses place machines elsewhere (another network namespace) by overriding this
        and :meth:`_command`.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        return sock, "127.0.0.1"

    def _command(self, host: str) -> list[str]:
        """The command that runs a machine reached at ``host`` (it inherits its socket)."""
        return [self.python, "-m", "bigpool.node"]

    def _copy(self, pipe: IO[bytes], stream: str, record: LocalProcess,
              machine: Machine | None) -> None:
        prefix = f"{record.addr}: "
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace")
                if not line.endswith("\n"):
                    line += "\n"
                if stream == "stderr":
                    record.stderr_tail.append(line)
                target = sys.stdout if stream == "stdout" else sys.stderr
                with _output_lock:
                    try:
                        target.write(prefix + line)
                        target.flush()
                    except (ValueError, OSError):
                        pass
        finally:
            pipe.close()
        if machine is not None:
            returncode = record.proc.wait()
            # Let stdout finish too, so the error's stderr tail and the copied output are whole.
            for thread in record.threads:
                if thread is not threading.current_thread():
                    thread.join(5)
            error_type = (KeepaliveExpiredError if returncode == EXIT_NO_KEEPALIVE
                          else MachineExitedError)
            machine._fail(error_type(record.addr, returncode, list(record.stderr_tail)))

    def kill(self, machine: Machine, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a machine's process (for tests of machine loss)."""
        record = self.processes.get(machine.addr)
        if record is not None and record.proc.poll() is None:
            record.proc.send_signal(sig)

    def kill_all(self) -> None:
        with self._lock:
            records = list(self.processes.values())
        for record in records:
            if record.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    record.proc.kill()

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._stop_all)
        _live.discard(self)

    def _stop_all(self) -> None:
        with self._lock:
            records = list(self.processes.values())
        for record in records:
            if record.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    record.proc.terminate()
        for record in records:
            try:
                record.proc.wait(TERMINATE_GRACE)
            except subprocess.TimeoutExpired:
                record.proc.kill()
                record.proc.wait()
        for record in records:
            for thread in record.threads:
                thread.join(10)
