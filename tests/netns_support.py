"""Hosts of our own: network namespaces on a bridge, for tests that cut, slow or kill hosts.

:class:`Hosts` builds ``n`` namespaces, each joined to a bridge in the root namespace by a
veth pair and given its own address in a private /24 (10.77.X.0/24, X from this process's
id, or the next one no interface uses). The driver (the test process) stays in the root namespace at ``.1`` on the bridge;
machines run inside the namespaces (``bigpool.systems.netns``), so every call crosses a veth
that :meth:`Hosts.cut` can take down. Names carry the creating process's id: leftovers of a
run that crashed are found by that id and removed (processes, namespaces, bridge) before a
new run builds its own, and a run never touches another live run's hosts.

Everything needs root and ``ip`` (iproute2); :func:`skip_unless_netns` says why not.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from bigpool.systems.netns import NETNS_DIR, NetnsHost

PREFIX = "bpr"
_NAME = re.compile(rf"^{PREFIX}(\d+)(h\d+|br|m\d+)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why namespaces cannot be built here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "needs root to build network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2) to build network namespaces"
    probe = f"{PREFIX}{os.getpid()}probe"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def skip_unless_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


def netem_unavailable(netns: str, dev: str) -> str | None:
    """Why ``tc netem`` cannot delay ``dev`` in ``netns``, or ``None`` if it can."""
    if shutil.which("tc") is None:
        return "needs the tc command (iproute2) for netem delay"
    add = subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
         "delay", "1ms"], capture_output=True, text=True, timeout=30,
    )
    if add.returncode != 0:
        return f"the kernel cannot add a netem qdisc (sch_netem missing?): {add.stderr.strip()}"
    subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "del", "dev", dev, "root"],
                   capture_output=True, timeout=30)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_netns_processes(netns: str) -> None:
    result = _ip("netns", "pids", netns, check=False)
    for word in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGKILL)


def remove_leftovers() -> list[str]:
    """Remove namespaces and bridges made by runs whose process is gone; what was removed."""
    removed = []
    try:
        namespaces = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        namespaces = []
    for name in namespaces:
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_netns_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    for parent in _memory_cgroup_parents():
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                match = _NAME.match(name)
                if match and not _pid_alive(int(match.group(1))):
                    _remove_cgroup(os.path.join(parent, name))
                    removed.append(name)
    return removed


def _free_subnet(first: int) -> int:
    """A /24 of 10.77.0.0/16 no interface here uses yet (another run may hold one)."""
    used = _ip("-o", "-4", "addr", "show", check=False).stdout
    for i in range(230):
        x = 20 + (first - 20 + i) % 230
        if f" 10.77.{x}." not in used:
            return x
    raise RuntimeError("no free 10.77.X.0/24 subnet for test hosts")


@dataclass(frozen=True)
class Host:
    """One namespace: its bigpool host, and the root-side end of its veth (cut it there)."""

    index: int
    netns: str
    address: str
    outer_veth: str
    inner_dev: str = "eth0"

    @property
    def netns_host(self) -> NetnsHost:
        return NetnsHost(self.netns, self.address)


class Hosts:
    """``n`` hosts on a bridge; a context manager that removes them all, whatever happens."""

    def __init__(self, n: int) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.subnet = _free_subnet(20 + os.getpid() % 230)
        self.bridge = f"{self.tag}br"
        self.driver_address = f"10.77.{self.subnet}.1"
        self.hosts = [
            Host(i, f"{self.tag}h{i}", f"10.77.{self.subnet}.{i + 2}", f"{self.tag}h{i}")
            for i in range(n)
        ]

    def __enter__(self) -> Hosts:
        remove_leftovers()
        self.remove()  # ours, if an earlier test of this process left anything
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.driver_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.outer_veth, "type", "veth", "peer", "name", host.inner_dev,
                "netns", host.netns)
            _ip("link", "set", host.outer_veth, "master", self.bridge)
            _ip("link", "set", host.outer_veth, "up")
            inside = ("netns", "exec", host.netns, "ip")
            _ip(*inside, "addr", "add", f"{host.address}/24", "dev", host.inner_dev)
            _ip(*inside, "link", "set", host.inner_dev, "up")
            _ip(*inside, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Kill every process in our namespaces, then delete the namespaces and the bridge."""
        for host in self.hosts:
            if os.path.exists(os.path.join(NETNS_DIR, host.netns)):
                _kill_netns_processes(host.netns)
                _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.outer_veth, check=False)
        _ip("link", "del", self.bridge, check=False)

    def processes(self) -> dict[str, list[int]]:
        """Live processes in each namespace (by namespace name)."""
        found = {}
        for host in self.hosts:
            pids = [int(p) for p in _ip("netns", "pids", host.netns, check=False).stdout.split()]
            found[host.netns] = [p for p in pids if _pid_alive(p)]
        return found

    def cut(self, host: Host) -> None:
        """Take the host's link down: its packets go nowhere, nothing is reset."""
        _ip("link", "set", host.outer_veth, "down")

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.outer_veth, "up")

    def delay(self, host: Host, ms: int) -> None:
        """Add ``ms`` of delay to everything the host sends (tc netem on its inside end)."""
        subprocess.run(
            ["ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", host.inner_dev,
             "root", "netem", "delay", f"{ms}ms"], check=True, capture_output=True, timeout=30,
        )


@contextlib.contextmanager
def hosts(n: int) -> Iterator[Hosts]:
    """Skip unless namespaces can be built; else ``n`` hosts, removed at the end."""
    skip_unless_netns()
    with Hosts(n) as built:
        yield built


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until every pid has exited (zombies count as exited); AssertionError if not."""
    started = time.monotonic()
    deadline = started + timeout
    while any(_pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            alive = [p for p in pids if _pid_alive(p)]
            raise AssertionError(f"processes {alive} still running after {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - started


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path for ``controller`` (v1), or the v2 path if ``None``."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if controller is None and number == "0" and controllers == "":
                return path
            if controller is not None and controller in controllers.split(","):
                return path
    return None


@contextlib.contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[str]:
    """A new memory cgroup (v1 or v2) limited to ``limit`` bytes, beside this process's own;
    skips with the reason if none can be made. At the end its processes are killed and it is
    removed."""
    path = None
    v1_parent = _own_cgroup("memory")
    try:
        if v1_parent is not None and os.path.isdir("/sys/fs/cgroup/memory"):
            path = f"/sys/fs/cgroup/memory{v1_parent.rstrip('/')}/{name}"
            os.mkdir(path)
            with open(f"{path}/memory.limit_in_bytes", "w") as f:
                f.write(str(limit))
        else:
            parent = _own_cgroup(None)
            if parent is None or not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                pytest.skip("no memory cgroup (v1 or v2) to put a memory limit in")
            path = f"/sys/fs/cgroup{parent.rstrip('/')}/{name}"
            os.mkdir(path)
            with open(f"{path}/memory.max", "w") as f:
                f.write(str(limit))
            with open(f"{path}/memory.swap.max", "w") as f:
                f.write("0")
    except OSError as exc:
        if path is not None and os.path.isdir(path):
            os.rmdir(path)
        pytest.skip(f"cannot make a memory cgroup with a limit: {exc}")
    try:
        yield path
    finally:
        _remove_cgroup(path)


def _memory_cgroup_parents() -> list[str]:
    """Where :func:`memory_cgroup` makes its cgroups (v1 and v2), for finding leftovers."""
    parents = []
    v1 = _own_cgroup("memory")
    if v1 is not None:
        parents.append(f"/sys/fs/cgroup/memory{v1.rstrip('/')}")
    v2 = _own_cgroup(None)
    if v2 is not None:
        parents.append(f"/sys/fs/cgroup{v2.rstrip('/')}")
    return [p for p in parents if os.path.isdir(p)]


def _remove_cgroup(path: str) -> None:
    """Kill the cgroup's processes and remove it (a cgroup goes only once it is empty)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(f"{path}/cgroup.procs") as f:
                pids = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
