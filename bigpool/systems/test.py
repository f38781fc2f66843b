"""The test system: machines inside this process, each with its own event loop thread.

Real servers, real TLS, real keepalives, only no processes: fast to start and easy to break.
``kill(machine)`` cuts a machine off as a crash would (its server stops answering and its
connections drop), so tests can watch the driver detect the loss. Keepalive timings are
short by default and settable.

In-process machines share the driver's ``os.environ`` and ``sys.argv``; the ``environ``
parameter is recorded per machine (``runtime.environ``) instead of changing the process's.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import TYPE_CHECKING

from ..h2rpc import LoopThread
from ..node import MachineRuntime
from . import KeepaliveConfig

if TYPE_CHECKING:
    from ..machine import B, Machine

__all__ = ["TestSystem"]


class _TestMachine:
    def __init__(self, loop_thread: LoopThread) -> None:
        self.loop_thread = loop_thread
        self.runtime: MachineRuntime | None = None
        self.exit_code: int | None = None
        self.exit_message = ""
        self.dead = threading.Event()


class TestSystem:
    """In-process machines for tests. ``kill(m)`` simulates losing machine ``m``."""

    name = "test"
    __test__ = False  # not a pytest test class

    def __init__(self, *, maxprocs: int = 1, keepalive: KeepaliveConfig | None = None) -> None:
        if not isinstance(maxprocs, int) or maxprocs < 1:
            raise ValueError(f"maxprocs must be a positive integer, not {maxprocs!r}")
        self._maxprocs = maxprocs
        self._keepalive = keepalive or KeepaliveConfig(period=0.5, timeout=3.0, rpc_timeout=1.0)
        self.handles: dict[str, _TestMachine] = {}
        self._b: B | None = None

    def init(self, b: B) -> None:
        self._b = b

    def keepalive_config(self) -> KeepaliveConfig:
        return self._keepalive

    def maxprocs(self) -> int:
        return self._maxprocs

    def needs_bundle(self) -> bool:
        return False

    async def start(self, b: B, count: int) -> list[Machine]:
        from ..machine import Machine

        if b.authority is None:
            raise RuntimeError("only a driver can start test machines")
        machines = []
        for _ in range(count):
            handle = _TestMachine(LoopThread("bigpool-test-machine"))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
            sock.setblocking(False)
            port = sock.getsockname()[1]
            addr = f"https://127.0.0.1:{port}/"
            credentials = b.authority.issue(f"machine {addr}", ips=["127.0.0.1"])

            async def boot(handle: _TestMachine = handle, sock: socket.socket = sock,
                           credentials: object = credentials) -> None:
                def exit_machine(code: int, message: str, handle: _TestMachine = handle) -> None:
                    handle.exit_code = code
                    handle.exit_message = message
                    self._stop(handle)

                runtime = MachineRuntime(
                    credentials,  # type: ignore[arg-type]
                    self,
                    maxprocs=self._maxprocs,
                    keepalive_timeout=self._keepalive.timeout * 4,
                    exit=exit_machine,
                    exec_allowed=False,
                )
                handle.runtime = runtime
                await runtime.serve(sock)

            await asyncio.wrap_future(handle.loop_thread.submit(boot()))
            self.handles[addr] = handle
            machine = Machine(addr, maxprocs=self._maxprocs)
            machine.system_handle = handle
            machines.append(machine)
        return machines

    def runtime(self, machine: Machine) -> MachineRuntime:
        """The machine-side runtime of ``machine`` (its server, environ, services)."""
        runtime = self.handles[machine.addr].runtime
        assert runtime is not None
        return runtime

    def kill(self, machine: Machine) -> None:
        """Cut ``machine`` off at once, as if its process died."""
        handle = self.handles[machine.addr]
        handle.exit_code = -9
        self._stop(handle)

    def _stop(self, handle: _TestMachine) -> None:
        if handle.dead.is_set():
            return
        handle.dead.set()
        runtime = handle.runtime

        def abort() -> None:
            if runtime is not None:
                runtime.server.abort()
                runtime.b._client.abort()
                # Services that own processes (the pool's workers) end them with the machine.
                for service in runtime.server.services.values():
                    close = getattr(service, "_bigpool_close", None)
                    if callable(close):
                        close()
                if runtime._watchdog is not None:
                    runtime._watchdog.cancel()

        try:
            handle.loop_thread.loop.call_soon_threadsafe(abort)
        except RuntimeError:
            return
        threading.Thread(target=handle.loop_thread.close, daemon=True).start()

    def is_dead(self, machine: Machine) -> bool:
        return self.handles[machine.addr].dead.is_set()

    async def shutdown(self) -> None:
        handles = list(self.handles.values())
        for handle in handles:
            self._stop(handle)
        for handle in handles:
            await asyncio.get_running_loop().run_in_executor(None, handle.loop_thread.close)
