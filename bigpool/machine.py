"""Machines and the cluster handle ``B``: states, boot, calls and keepalives.

This module owns the machine state machine. Rule: a machine's state changes only through
``Machine._set_state``, only forward, along::

    UNSTARTED ──> STARTING ──> RUNNING ──> STOPPED
         └────────────┴───────────┴──────────^   (any state may stop, with an error)

A machine the driver started (``owned``) is booted by :meth:`Machine._boot` (wait for the
supervisor to answer, ship the code bundle if the system needs it, pass argv and environment,
register the services) and then kept alive by :meth:`Machine._keepalive_loop`. When keepalives
fail for longer than the system's timeout, the machine is lost: its pending calls fail with
:class:`NetworkError`, it goes to STOPPED, and later calls fail fast.

All of this runs on one event loop (a background thread in the driver). The public methods
are synchronous and safe to call from any thread; ``*_async`` twins serve asyncio users,
whatever loop they run on.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import os
import sys
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import dill

from .h2rpc import (
    BigpoolError,
    CallTimeoutError,
    Client,
    Credentials,
    LoopThread,
    NetworkError,
    StreamReader,
    SyncStreamReader,
    parse_address,
)
from .systems import KeepaliveConfig, System, get_system

__all__ = ["B", "Machine", "MachineStoppedError", "State", "add_arguments", "start"]

T = TypeVar("T")

# How many keepalive latencies a machine remembers (most recent first).
KEEPALIVE_REPLY_TIMES = 10
# Retry backoff for temporary errors: first wait, and the cap it doubles up to.
RETRY_INITIAL_BACKOFF = 1.0
RETRY_MAX_BACKOFF = 5.0
# How long a booting machine may take to answer its first ping.
DEFAULT_BOOT_TIMEOUT = 120.0


class State(enum.IntEnum):
    """A machine's state; states only move forward."""

    UNSTARTED = 0
    STARTING = 1
    RUNNING = 2
    STOPPED = 3

    def __str__(self) -> str:
        return self.name


class MachineStoppedError(BigpoolError):
    """A call was made to (or was pending on) a machine that has stopped.

    ``__cause__`` is the machine's error (``machine.err()``). Not temporary: a stopped machine
    never comes back; retry elsewhere.
    """

    def __init__(self, addr: str, reason: BaseException | None) -> None:
        self.addr = addr
        self.reason = reason
        detail = f": {type(reason).__name__}: {reason}" if reason is not None else ""
        super().__init__(f"machine {addr} is stopped{detail}")


class Machine:
    """One machine of the cluster: a process (or host) serving services at :attr:`addr`.

    Made by :meth:`B.start` (owned: booted and kept alive by this driver) or :meth:`B.dial`
    (not owned). ``call`` waits until the machine is RUNNING and fails fast once it is STOPPED.
    """

    def __init__(self, addr: str, *, maxprocs: int = 1, owned: bool = False) -> None:
        parse_address(addr)
        self.addr = addr
        self.maxprocs = maxprocs
        self.owned = owned
        self._state = State.UNSTARTED
        self._err: BaseException | None = None
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[State, asyncio.Future[None]]] = []
        self._calls: set[asyncio.Task[Any]] = set()
        self._stop_cancelled: set[asyncio.Task[Any]] = set()
        self._keepalive_times: collections.deque[float] = collections.deque(
            maxlen=KEEPALIVE_REPLY_TIMES
        )
        self._next_keepalive: float | None = None
        self._b: B | None = None
        self._lifecycle: asyncio.Task[None] | None = None
        self.started_at: float | None = None
        self.pid: int | None = None
        self.system_handle: Any = None  # the system's own record of this machine

    def __repr__(self) -> str:
        return f"<Machine {self.addr} {self._state.name}>"

    # state ---------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def hostname(self) -> str:
        return parse_address(self.addr)[0]

    def err(self) -> BaseException | None:
        """Why the machine stopped (``None`` while it has not, or stopped cleanly)."""
        return self._err

    def _set_state(self, state: State, err: BaseException | None = None) -> None:
        with self._cond:
            if state <= self._state:
                return
            self._state = state
            if state is State.STOPPED and err is not None and self._err is None:
                self._err = err
            self._cond.notify_all()
        waiters = [w for w in self._async_waiters if w[0] <= state]
        self._async_waiters = [w for w in self._async_waiters if w[0] > state]
        for _, future in waiters:
            if not future.done():
                future.get_loop().call_soon_threadsafe(_resolve, future)
        if state is State.STOPPED:
            self._on_stopped()

    def _on_stopped(self) -> None:
        for task in list(self._calls):
            self._stop_cancelled.add(task)
            task.get_loop().call_soon_threadsafe(task.cancel)
        if self._b is not None:
            client = self._b._client
            self._b._loop.call_soon_threadsafe(client.disconnect, self.addr)
        if self._lifecycle is not None and self._lifecycle is not _current_task_or_none():
            lifecycle = self._lifecycle
            lifecycle.get_loop().call_soon_threadsafe(lifecycle.cancel)

    def _fail(self, err: BaseException) -> None:
        """Stop the machine with ``err`` (from any thread)."""
        self._set_state(State.STOPPED, err)

    def wait(self, state: State = State.RUNNING, timeout: float | None = None) -> State:
        """Block until the machine reaches ``state`` or a later one; returns the state then.

        A machine that fails while booting reaches STOPPED, so ``wait(RUNNING)`` returns for it
        too: check :meth:`err`. Raises ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._state >= state, timeout):
                raise TimeoutError(
                    f"machine {self.addr} did not reach {state.name} within {timeout}s "
                    f"(state {self._state.name})"
                )
            return self._state

    async def wait_async(self, state: State = State.RUNNING) -> State:
        """Wait (on any event loop) until the machine reaches ``state`` or later."""
        if self._state >= state:
            return self._state
        future = asyncio.get_running_loop().create_future()
        self._async_waiters.append((state, future))
        if self._state >= state:  # raced with a state change on another thread
            return self._state
        await future
        return self._state

    def keepalive_reply_times(self) -> list[float]:
        """The latest keepalive round trips in seconds, most recent first."""
        return list(reversed(self._keepalive_times))

    @property
    def next_keepalive(self) -> float | None:
        """When (``time.time()``) the machine expects its next keepalive."""
        return self._next_keepalive

    # calls ---------------------------------------------------------------------------------

    def _require_b(self) -> B:
        if self._b is None:
            raise RuntimeError(f"machine {self.addr} belongs to no B; use B.start or B.dial")
        return self._b

    def call(self, service_method: str, arg: Any = None, *, timeout: float | None = None) -> Any:
        """Call ``service_method`` (``"Service.method"``) with ``arg``; its reply.

        Waits for RUNNING first. Raises the remote method's own exception (with the remote
        traceback as ``__cause__``), :class:`CallTimeoutError` after ``timeout`` seconds (the
        remote call is cancelled), :class:`NetworkError` if the machine is lost meanwhile, and
        :class:`MachineStoppedError` if it had already stopped. A streamed reply is returned
        as a blocking file-like :class:`SyncStreamReader`.
        """
        b = self._require_b()
        result = b._run(self._call(service_method, arg, timeout))
        if isinstance(result, StreamReader):
            return SyncStreamReader(result, b._loop)
        return result

    async def call_async(
        self, service_method: str, arg: Any = None, *, timeout: float | None = None
    ) -> Any:
        """:meth:`call` for asyncio code, on any event loop; cancelling it cancels the call."""
        b = self._require_b()
        return await b._await(self._call(service_method, arg, timeout))

    def retry_call(
        self,
        service_method: str,
        arg: Any = None,
        *,
        timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> Any:
        """:meth:`call`, retried on temporary (network) errors with backoff from 1 s to 5 s.

        Other errors, and a stopped machine, end the retries at once. ``total_timeout`` bounds
        the whole, retries included.
        """
        b = self._require_b()
        return b._run(self._retry_call(service_method, arg, timeout, total_timeout))

    async def retry_call_async(
        self,
        service_method: str,
        arg: Any = None,
        *,
        timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> Any:
        b = self._require_b()
        return await b._await(self._retry_call(service_method, arg, timeout, total_timeout))

    async def _retry_call(
        self, service_method: str, arg: Any, timeout: float | None, total_timeout: float | None
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if total_timeout is None else loop.time() + total_timeout
        backoff = RETRY_INITIAL_BACKOFF
        while True:
            try:
                return await self._call(service_method, arg, timeout)
            except BigpoolError as exc:
                if not exc.temporary or self._state is State.STOPPED:
                    raise
                if deadline is not None and loop.time() + backoff > deadline:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_BACKOFF)

    async def _call(self, service_method: str, arg: Any, timeout: float | None) -> Any:
        """Run on B's loop: wait for RUNNING, make the call, fail it if the machine stops."""
        if self._state < State.RUNNING:
            await self.wait_async(State.RUNNING)
        return await self._call_now(service_method, arg, timeout)

    async def _call_now(self, service_method: str, arg: Any, timeout: float | None) -> Any:
        if self._state is State.STOPPED:
            raise MachineStoppedError(self.addr, self._err) from self._err
        b = self._require_b()
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            return await b._client.call(self.addr, service_method, arg, timeout=timeout)
        except asyncio.CancelledError:
            if task in self._stop_cancelled:
                err = self._err
                if isinstance(err, NetworkError):
                    raise NetworkError(f"{service_method}: {err}", addr=self.addr) from err
                raise MachineStoppedError(self.addr, err) from err
            raise
        finally:
            self._calls.discard(task)
            self._stop_cancelled.discard(task)

    def cancel(self) -> None:
        """Cancel every pending call and stop the machine (its error: ``CancelledError``)."""
        self._fail(concurrent.futures.CancelledError(f"machine {self.addr} was cancelled"))

    # information ---------------------------------------------------------------------------

    def mem_info(self) -> dict[str, Any]:
        """The machine's memory use (psutil's virtual_memory fields, and this process's RSS)."""
        return dict(self.call("Supervisor.mem_info", timeout=30))

    def disk_info(self) -> dict[str, Any]:
        """Disk use where the machine keeps its temporary files (psutil's disk_usage fields)."""
        return dict(self.call("Supervisor.disk_info", timeout=30))

    def load_info(self) -> dict[str, Any]:
        """The machine's load averages over 1, 5 and 15 minutes."""
        return dict(self.call("Supervisor.load_info", timeout=30))

    # lifecycle (on B's loop) -----------------------------------------------------------------

    def _attach(self, b: B) -> None:
        self._b = b

    async def _boot_and_keepalive(self, b: B, registrations: Sequence[tuple[str, bytes]],
                                  environ: Sequence[str]) -> None:
        try:
            await self._boot(b, registrations, environ)
        except asyncio.CancelledError:
            if self._state is not State.STOPPED:
                self._fail(concurrent.futures.CancelledError("machine start was cancelled"))
            return
        except BaseException as exc:
            self._fail(exc)
            return
        self._set_state(State.RUNNING)
        with contextlib.suppress(asyncio.CancelledError):
            await self._keepalive_loop(b)

    async def _boot(self, b: B, registrations: Sequence[tuple[str, bytes]],
                    environ: Sequence[str]) -> None:
        self._set_state(State.STARTING)
        self.started_at = time.time()
        system = b.system
        await self._await_supervisor(b, b.boot_timeout)
        if system.needs_bundle():
            await self._install_bundle(b)
        await b._client.call(self.addr, "Supervisor.setargs", list(sys.argv), timeout=30)
        if environ:
            await b._client.call(self.addr, "Supervisor.setenv", list(environ), timeout=30)
        # The first keepalive arms the machine's watchdog with this driver's timeout.
        await self._keepalive_once(b)
        for name, payload in registrations:
            try:
                await b._client.call(self.addr, "Supervisor.register", (name, payload), timeout=120)
            except BigpoolError as exc:
                if exc.temporary:
                    raise
                raise ServiceStartError(name, self.addr, exc) from exc
            except Exception as exc:
                raise ServiceStartError(name, self.addr, exc) from exc

    async def _await_supervisor(
        self, b: B, timeout: float, digest: str | None = None
    ) -> dict[str, Any]:
        """Ping until the supervisor answers (running ``digest``, if given); its info.

        Fails after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.005
        while True:
            if self._state is State.STOPPED:
                raise MachineStoppedError(self.addr, self._err)
            try:
                info: dict[str, Any] = await b._client.call(
                    self.addr, "Supervisor.info", None, timeout=max(1.0, min(10.0, timeout))
                )
                if digest is None or info.get("digest") == digest:
                    self.pid = info.get("pid")
                    return info
                failure = f"it runs digest {info.get('digest')!r}, not {digest!r}"
            except NetworkError as exc:
                failure = str(exc)
            if loop.time() + delay > deadline:
                raise NetworkError(
                    f"machine did not answer within {timeout:g}s: {failure}", addr=self.addr
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _install_bundle(self, b: B) -> None:
        """Give the machine the driver's code (upload only if it lacks it) and exec into it."""
        from .bundle import current_bundle, serialize_bundle

        bundle = await asyncio.get_running_loop().run_in_executor(None, current_bundle)
        info = await b._client.call(self.addr, "Supervisor.info", None, timeout=30)
        if info.get("digest") == bundle.digest:
            return
        if bundle.digest not in info.get("bundles", ()):
            data = serialize_bundle(bundle)
            await b._client.call(self.addr, "Supervisor.setbinary", iter([data]), timeout=600)
            b.bundle_uploads += 1
        await b._client.call(self.addr, "Supervisor.setargs", list(sys.argv), timeout=30)
        await b._client.call(self.addr, "Supervisor.exec", bundle.digest, timeout=30)
        # Until the exec happens the old image still answers: wait for the new digest.
        await self._await_supervisor(b, b.boot_timeout, digest=bundle.digest)

    async def _keepalive_once(self, b: B) -> None:
        config = b.keepalive
        started = time.monotonic()
        reply = await b._client.call(
            self.addr, "Supervisor.keepalive", config.timeout, timeout=config.rpc_timeout
        )
        self._keepalive_times.append(time.monotonic() - started)
        self._next_keepalive = time.time() + float(reply.get("next", config.timeout))

    async def _keepalive_loop(self, b: B) -> None:
        config = b.keepalive
        last_ok = time.monotonic()
        while self._state is State.RUNNING:
            try:
                await self._keepalive_once(b)
                last_ok = time.monotonic()
                await asyncio.sleep(config.period)
            except (NetworkError, CallTimeoutError) as exc:
                silent = time.monotonic() - last_ok
                if silent >= config.timeout:
                    self._fail(
                        NetworkError(
                            f"machine lost: keepalives failed for {silent:.1f}s "
                            f"(timeout {config.timeout:g}s): {exc}",
                            addr=self.addr,
                        )
                    )
                    return
                await asyncio.sleep(min(config.period, max(0.05, config.timeout - silent) / 4))
            except Exception as exc:
                self._fail(exc)
                return


class ServiceStartError(BigpoolError):
    """A service could not be installed on a machine: it did not unpickle there, or its
    ``init`` raised. ``__cause__`` is the error from the machine."""

    def __init__(self, service: str, addr: str, cause: BaseException) -> None:
        self.service = service
        self.addr = addr
        super().__init__(f"service {service!r} failed to start on {addr}: "
                         f"{type(cause).__name__}: {cause}")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _current_task_or_none() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _pickle_services(services: Mapping[str, object]) -> list[tuple[str, bytes]]:
    registrations = []
    for name, service in services.items():
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ValueError(f"service name {name!r} must be a non-empty string without '.' or '/'")
        if name == "Supervisor":
            raise ValueError("the service name 'Supervisor' is reserved for bigpool")
        try:
            payload = dill.dumps(service, recurse=True)
        except Exception as exc:
            raise TypeError(
                f"service {name!r} ({type(service).__name__}) cannot be pickled to send to "
                f"machines: {type(exc).__name__}: {exc}"
            ) from exc
        registrations.append((name, payload))
    return registrations


def _check_environ(environ: Iterable[str]) -> list[str]:
    items = list(environ)
    for item in items:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise ValueError(f"environ entries must be 'KEY=VALUE' strings, not {item!r}")
    return items


class B:
    """The cluster handle: starts machines, dials them, and shuts them all down.

    Made by :func:`bigpool.start` on the driver (also a context manager that shuts down on
    exit). On a machine, services receive the machine's own ``B`` in ``init(self, b)``, through
    which they can :meth:`dial` other machines, authenticated with that machine's certificate.
    """

    def __init__(
        self,
        system: System,
        *,
        credentials: Credentials,
        authority: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        self.system = system
        self.authority = authority
        self.credentials = credentials
        self.boot_timeout = boot_timeout
        self.bundle_uploads = 0
        self._loop_thread: LoopThread | None = None
        if loop is None:
            self._loop_thread = LoopThread("bigpool-driver")
            loop = self._loop_thread.loop
        self._loop = loop
        self._client = Client(credentials.client_context())
        self._machines: list[Machine] = []
        self._lock = threading.Lock()
        self._shutdown = False
        self.keepalive: KeepaliveConfig = system.keepalive_config()

    @property
    def is_driver(self) -> bool:
        """True on the driver (which holds the authority), False on a machine."""
        return self.authority is not None

    def __repr__(self) -> str:
        role = "driver" if self.is_driver else "machine"
        return f"<B {role} system={self.system.name} machines={len(self._machines)}>"

    def __enter__(self) -> B:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # running coroutines on our loop ----------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._loop_thread is not None:
            return self._loop_thread.run(coro, timeout)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise RuntimeError(
                "a blocking bigpool call was made on the machine's event loop; "
                "use the *_async method from async code"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # machines ------------------------------------------------------------------------------

    def machines(self) -> list[Machine]:
        """A snapshot of the machines this B knows (started or dialled)."""
        with self._lock:
            return list(self._machines)

    def start(
        self,
        n: int,
        *,
        services: Mapping[str, object] | None = None,
        environ: Iterable[str] = (),
    ) -> list[Machine]:
        """Launch ``n`` machines, each serving ``services`` (name -> object).

        Returns at once with machines that may still be booting: ``m.wait(State.RUNNING)``
        then check ``m.err()``. The services are pickled here with dill (a class defined in
        ``__main__`` works) and unpickled on each machine, where an optional
        ``init(self, b)`` runs; if either fails, that machine stops with the error.
        ``environ`` entries (``"KEY=VALUE"``) are added to each machine's environment before
        its services start. The machines are kept alive until :meth:`shutdown`.
        """
        return self._run(self.start_async(n, services=services, environ=environ))

    async def start_async(
        self,
        n: int,
        *,
        services: Mapping[str, object] | None = None,
        environ: Iterable[str] = (),
    ) -> list[Machine]:
        if not self.is_driver:
            raise RuntimeError("only the driver can start machines")
        if self._shutdown:
            raise RuntimeError("this B has been shut down")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"number of machines must be a positive integer, not {n!r}")
        if not services:
            raise ValueError("machines need at least one service (services={'Name': obj})")
        registrations = _pickle_services(services)
        env = _check_environ(environ)
        return await self._await(self._start(n, registrations, env))

    async def _start(self, n: int, registrations: list[tuple[str, bytes]],
                     environ: list[str]) -> list[Machine]:
        machines = await self.system.start(self, n)
        if not machines:
            raise BigpoolError(f"system {self.system.name} started no machines")
        for m in machines:
            m.owned = True
            m._attach(self)
            with self._lock:
                self._machines.append(m)
            m._lifecycle = self._loop.create_task(m._boot_and_keepalive(self, registrations, environ))
        return machines

    def dial(self, addr: str) -> Machine:
        """A handle on the machine at ``addr``; not owned (this B does not keep it alive)."""
        return self._run(self.dial_async(addr))

    async def dial_async(self, addr: str) -> Machine:
        m = Machine(addr, owned=False)
        m._attach(self)
        await self._await(self._dial(m))
        return m

    async def _dial(self, m: Machine) -> None:
        m._set_state(State.STARTING)
        info = await m._await_supervisor(self, 30.0)
        m.maxprocs = int(info.get("maxprocs") or 1)
        with self._lock:
            self._machines.append(m)
        m._set_state(State.RUNNING)

    def shutdown(self) -> None:
        """Stop every owned machine, wait for their output, and release everything.

        Safe to call more than once.
        """
        if self._shutdown:
            return
        self._shutdown = True
        try:
            if self._loop_thread is not None:
                self._loop_thread.run(self._shutdown_async(), timeout=60)
            else:
                asyncio.run_coroutine_threadsafe(self._shutdown_async(), self._loop).result(60)
        finally:
            if self._loop_thread is not None:
                self._loop_thread.close()

    async def _shutdown_async(self) -> None:
        owned = [m for m in self.machines() if m.owned]
        for m in owned:
            if m._lifecycle is not None:
                m._lifecycle.cancel()
        for m in owned:
            m._set_state(State.STOPPED)
        if self.is_driver:
            await self.system.shutdown()
        await self._client.close()


# driver start --------------------------------------------------------------------------------

SYSTEM_ENV = "BIGPOOL_SYSTEM"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add bigpool's standard flags (as Bigmachine's ``-bigm.system``) to ``parser``."""
    group = parser.add_argument_group("bigpool")
    group.add_argument(
        "--bigpool-system",
        dest="bigpool_system",
        default=None,
        help=f"system that provides machines: local, test, ec2, ... (default ${SYSTEM_ENV} or local)",
    )


def start(
    system: str | System | None = None,
    *,
    args: argparse.Namespace | None = None,
    ca_path: str | os.PathLike[str] | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    **system_options: Any,
) -> B:
    """Start the driver: make the cluster's authority and return the cluster handle ``B``.

    ``system`` is a system name or object; otherwise it comes from ``args.bigpool_system``
    (flags added by :func:`add_arguments`), then ``$BIGPOOL_SYSTEM``, then ``"local"``.
    ``system_options`` go to the system's constructor when a name is given. ``ca_path`` keeps
    the authority in a file (mode 0600) instead of memory.
    """
    if system is None and args is not None:
        system = getattr(args, "bigpool_system", None)
    if system is None:
        system = os.environ.get(SYSTEM_ENV) or "local"
    if isinstance(system, str):
        system = get_system(system, **system_options)
    elif system_options:
        raise TypeError("system options can only be given with a system name")
    if not isinstance(system, System):
        raise TypeError(f"system must be a name or a System, not {type(system).__name__}")
    from .h2rpc.authority import Authority

    authority = Authority.load_or_create(ca_path) if ca_path is not None else Authority.create()
    credentials = authority.issue("bigpool-driver", ips=["127.0.0.1"], dns=["localhost"])
    b = B(system, credentials=credentials, authority=authority, boot_timeout=boot_timeout)
    try:
        system.init(b)
    except BaseException:
        b.shutdown()
        raise
    return b
