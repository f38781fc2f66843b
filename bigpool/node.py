"""The machine side: what runs in a machine's process (``python -m bigpool.node``).

:class:`MachineRuntime` serves the :class:`Supervisor` and the user's services over mutual
TLS, and runs the watchdog that ends the machine when keepalives stop (so a driver that dies,
even by SIGKILL, leaves no machine behind). The local system starts this module as a process
and hands it, through inherited file descriptors and the environment (the EC2 system's first
stage, :mod:`bigpool.systems.ec2_stage1`, does the same on an instance):

* ``BIGPOOL_LISTEN_FD``: a listening socket the driver bound (no port race);
* ``BIGPOOL_CREDENTIALS_FD``: a pipe carrying this machine's leaf key and certificate and the
  CA certificate (never the CA key), read once and closed;
* ``BIGPOOL_KEEPALIVE_TIMEOUT``: how long to wait for the first keepalive;
* ``BIGPOOL_MAXPROCS``, ``BIGPOOL_SYSTEM``, and after an exec ``BIGPOOL_BUNDLE_DIGEST`` and
  ``BIGPOOL_ARGV``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._malloc import tune_malloc
from .h2rpc import Credentials, Server, StreamReader
from .h2rpc.loop import run
from .supervisor import Supervisor

if TYPE_CHECKING:
    from .machine import B
    from .systems import System

__all__ = ["MachineRuntime", "main"]

ENV_LISTEN_FD = "BIGPOOL_LISTEN_FD"
ENV_CREDENTIALS_FD = "BIGPOOL_CREDENTIALS_FD"
ENV_KEEPALIVE_TIMEOUT = "BIGPOOL_KEEPALIVE_TIMEOUT"
ENV_MAXPROCS = "BIGPOOL_MAXPROCS"
ENV_SYSTEM = "BIGPOOL_SYSTEM_NAME"
ENV_DIGEST = "BIGPOOL_BUNDLE_DIGEST"
ENV_ARGV = "BIGPOOL_ARGV"
ENV_BUNDLE_DIR = "BIGPOOL_BUNDLE_DIR"

# Exit code of a machine whose watchdog fired (no keepalive in time).
EXIT_NO_KEEPALIVE = 3


def encode_credentials(credentials: Credentials) -> bytes:
    return json.dumps(
        {
            "cert": credentials.cert_pem.decode("ascii"),
            "key": credentials.key_pem.decode("ascii"),
            "ca": credentials.ca_pem.decode("ascii"),
        }
    ).encode("ascii")


def decode_credentials(data: bytes) -> Credentials:
    fields = json.loads(data)
    return Credentials(
        cert_pem=fields["cert"].encode("ascii"),
        key_pem=fields["key"].encode("ascii"),
        ca_pem=fields["ca"].encode("ascii"),
    )


class MachineRuntime:
    """A machine's server, supervisor and watchdog, on the running event loop.

    ``exit`` ends the machine (the process, for local machines); ``apply_environ`` makes
    environment changes visible to services (``os.environ`` for a process of its own).
    """

    def __init__(
        self,
        credentials: Credentials,
        system: System,
        *,
        maxprocs: int = 1,
        keepalive_timeout: float = 120.0,
        exit: Callable[[int, str], None],
        apply_environ: Callable[[list[tuple[str, str]]], None] | None = None,
        digest: str | None = None,
        bundle_dir: str | None = None,
        exec_allowed: bool = True,
    ) -> None:
        from .machine import B

        self.credentials = credentials
        self.system = system
        self.maxprocs = maxprocs
        self.digest = digest
        self.loop = asyncio.get_running_loop()
        self.server = Server(credentials.server_context())
        self.supervisor = Supervisor(self)
        self.server.register("Supervisor", self.supervisor)
        self.b: B = B(system, credentials=credentials, loop=self.loop)
        self._exit = exit
        self._apply_environ = apply_environ
        self.environ: dict[str, str] = {}
        self.args: list[str] = list(sys.argv)
        self._deadline = time.monotonic() + keepalive_timeout
        self._watchdog: asyncio.Task[None] | None = None
        self._bundle_dir = bundle_dir
        self.last_bundle_path: str | None = None
        self._exec_allowed = exec_allowed
        self._sock: socket.socket | None = None
        self._exiting = False
        self._exec_task: asyncio.Task[None] | None = None

    async def serve(self, sock: socket.socket) -> tuple[str, int]:
        self._sock = sock
        address = await self.server.start(sock=sock)
        self._watchdog = self.loop.create_task(self._watch())
        return address

    # keepalive -------------------------------------------------------------------------------

    def extend_deadline(self, seconds: float) -> None:
        """A keepalive arrived: the machine now lives ``seconds`` more (replacing the boot grace)."""
        self._deadline = time.monotonic() + seconds

    async def _watch(self) -> None:
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self.exit(EXIT_NO_KEEPALIVE, "no keepalive from the driver in time; exiting")
                return
            await asyncio.sleep(min(remaining, 1.0))

    def schedule_exit(self, delay: float, message: str = "") -> None:
        self.loop.call_later(delay, self.exit, 0, message or "shut down by the driver")

    def exit(self, code: int, message: str) -> None:
        if self._exiting:
            return
        self._exiting = True
        self._exit(code, message)

    # argv and environment ------------------------------------------------------------------

    def set_args(self, args: list[str]) -> None:
        self.args = args
        if self._apply_environ is None:
            return  # in-process machines share the driver's sys.argv
        sys.argv[:] = args

    def set_environ(self, pairs: list[tuple[str, str]]) -> None:
        for key, value in pairs:
            self.environ[key] = value
        if self._apply_environ is not None:
            self._apply_environ(pairs)

    # bundles -------------------------------------------------------------------------------

    @property
    def bundle_dir(self) -> str:
        from .bundle import bundle_store_dir

        return self._bundle_dir or bundle_store_dir()

    def stored_bundles(self) -> list[str]:
        from .bundle import stored_digests

        try:
            return stored_digests(self.bundle_dir)
        except FileNotFoundError:
            return []

    async def store_bundle(self, reader: StreamReader) -> str:
        from .bundle import deserialize_bundle, write_bundle

        data = await reader.read()
        bundle = await self.loop.run_in_executor(None, deserialize_bundle, data)
        path = await self.loop.run_in_executor(None, write_bundle, bundle, self.bundle_dir)
        self.last_bundle_path = path
        return bundle.digest

    def _bundle_path(self, digest: str) -> str:
        hexdigest = digest.split(":", 1)[-1]
        return os.path.join(self.bundle_dir, f"{hexdigest}.zip")

    def running_bundle_path(self) -> str | None:
        """Where the bundle this process runs is stored, if it runs one."""
        return self._bundle_path(self.digest) if self.digest else None

    def check_bundle(self, digest: str) -> None:
        if not self._exec_allowed:
            raise RuntimeError(f"machines of system {self.system.name!r} cannot exec")
        if digest not in self.stored_bundles():
            raise FileNotFoundError(f"bundle {digest} is not stored on this machine")

    def exec_bundle(self, digest: str) -> None:
        """Soon (after the exec call's reply is out) replace this process with a Python that
        has the bundle first on its path.

        The Python is this one, unless the system's optional ``bundle_python(path)`` names
        another (the EC2 system's venv for the bundle's environment). That call may take long
        (it may install packages), so it runs on a thread while the old image keeps answering
        (the driver waits for the new digest); if it fails, the machine exits saying why.
        """
        self._exec_task = self.loop.create_task(self._exec_bundle(digest))

    async def _exec_bundle(self, digest: str) -> None:
        await asyncio.sleep(0.05)
        python = sys.executable
        choose = getattr(self.system, "bundle_python", None)
        if callable(choose):
            try:
                python = await self.loop.run_in_executor(None, choose, self._bundle_path(digest))
            except Exception as exc:
                self.exit(1, f"cannot prepare the environment of bundle {digest}: "
                             f"{type(exc).__name__}: {exc}")
                return
        self._exec(digest, python)

    def _exec(self, digest: str, python: str) -> None:
        assert self._sock is not None
        path = self._bundle_path(digest)
        env = dict(os.environ)
        env.update(self.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
        env[ENV_DIGEST] = digest
        env[ENV_ARGV] = json.dumps(self.args)
        env[ENV_BUNDLE_DIR] = self.bundle_dir
        env[ENV_LISTEN_FD] = str(self._sock.fileno())
        env[ENV_KEEPALIVE_TIMEOUT] = str(max(1.0, self._deadline - time.monotonic()))
        os.set_inheritable(self._sock.fileno(), True)
        read_fd, write_fd = os.pipe()
        os.write(write_fd, encode_credentials(self.credentials))
        os.close(write_fd)
        os.set_inheritable(read_fd, True)
        env[ENV_CREDENTIALS_FD] = str(read_fd)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(python, [python, "-m", "bigpool.node"], env)


def _read_all_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _process_exit(code: int, message: str) -> None:
    # The driver may be gone, and our stdout and stderr with it: nothing may stop the exit.
    try:
        if message:
            print(f"bigpool machine: {message}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    finally:
        os._exit(code)


def _apply_process_environ(pairs: list[tuple[str, str]]) -> None:
    for key, value in pairs:
        os.environ[key] = value


async def _main_async(system_name: str) -> None:
    from .systems import get_system

    credentials = decode_credentials(_read_all_fd(int(os.environ.pop(ENV_CREDENTIALS_FD))))
    listen_fd = int(os.environ.pop(ENV_LISTEN_FD))
    sock = socket.socket(fileno=listen_fd)
    sock.setblocking(False)
    system = get_system(system_name)
    runtime = MachineRuntime(
        credentials,
        system,
        maxprocs=int(os.environ.get(ENV_MAXPROCS, "1")),
        keepalive_timeout=float(os.environ.get(ENV_KEEPALIVE_TIMEOUT, "120")),
        exit=_process_exit,
        apply_environ=_apply_process_environ,
        digest=os.environ.get(ENV_DIGEST) or None,
        bundle_dir=os.environ.get(ENV_BUNDLE_DIR) or None,
    )
    await runtime.serve(sock)
    await asyncio.Event().wait()  # serve until the watchdog or the driver ends the process


def main() -> None:
    """Entry point of a machine process. Never returns normally: the machine exits."""
    argv = os.environ.pop(ENV_ARGV, None)
    if argv is not None:
        sys.argv[:] = json.loads(argv)
    system_name = os.environ.get(ENV_SYSTEM, "local")
    tune_malloc()
    try:
        run(_main_async(system_name))  # on uvloop when installed (h2rpc.loop.new_event_loop)
    except KeyboardInterrupt:
        _process_exit(130, "interrupted")
    except BaseException as exc:
        _process_exit(1, f"machine failed: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
