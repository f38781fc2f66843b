"""The netns system: machines as processes in Linux network namespaces of this host.

Each namespace stands for a host with an address of its own, so calls between the driver and
its machines cross real interfaces (veth pairs, a bridge) that can be cut, slowed or dropped.
It is how bigpool's reliability tests put machines on several "hosts" without several
computers; the namespaces themselves (``ip netns add``, addresses, routes) are made by the
caller, which needs root. Otherwise it is the local system: the driver binds each machine's
listening socket (inside the machine's namespace, so there is still no port race) and hands
it, with the machine's certificate, to ``python -m bigpool.node`` run in that namespace.

Only the network is the host's own: the machines share this host's files and ``/dev/shm``, so
a :class:`bigpool.BigPool` finds them on the driver's host and skips the network for their
records and large payloads unless it is made with ``shared_memory=False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .local import LocalSystem

if TYPE_CHECKING:
    from ..machine import B, Machine

__all__ = ["NetnsHost", "NetnsSystem"]

NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class NetnsHost:
    """A host: the network namespace ``netns`` (a name ``ip netns`` knows) and the IPv4
    ``address`` its machines listen on, which the driver must be able to reach.

    ``cgroup``, a cgroup directory (v1 or v2), holds the host's machine processes, and so
    their workers: give it a memory limit and the host has that much memory. Each machine is
    moved there before :meth:`NetnsSystem.start` returns it, so before it can start workers.
    """

    netns: str
    address: str
    cgroup: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.netns, str) or not self.netns or "/" in self.netns:
            raise ValueError(f"netns must be a namespace name, not {self.netns!r}")
        try:
            socket.inet_aton(self.address)
        except (OSError, TypeError):
            raise ValueError(f"address must be an IPv4 address, not {self.address!r}") from None


def _setns(path: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def listen_in_netns(host: NetnsHost) -> socket.socket:
    """A TCP socket listening on ``host.address`` (port chosen by the kernel), in its namespace.

    Network namespaces are per thread: a short-lived thread enters the namespace, makes the
    socket (which stays in that namespace for life) and ends, so no other thread moves.
    """
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            _setns(os.path.join(NETNS_DIR, host.netns))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host.address, 0))
                sock.listen(1024)
            except BaseException:
                sock.close()
                raise
            made.append(sock)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name=f"bigpool-netns-{host.netns}", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise OSError(f"cannot listen on {host.address} in netns {host.netns!r}: {failed[0]}") \
            from failed[0]
    return made[0]


class NetnsSystem(LocalSystem):
    """Local machines spread round-robin over ``hosts`` (network namespaces).

    Takes the local system's options (``maxprocs``, ``keepalive``, ...). :meth:`host_of` says
    where a machine runs; ``place`` (a host) pins the next machines to one host.
    """

    name = "netns"

    def __init__(self, hosts: Sequence[NetnsHost] = (), **options: Any) -> None:
        super().__init__(**options)
        self.hosts = list(hosts)
        for host in self.hosts:
            if not isinstance(host, NetnsHost):
                raise TypeError(f"hosts must be NetnsHost objects, not {type(host).__name__}")
        self.place: NetnsHost | None = None
        self._next_host = itertools.cycle(self.hosts) if self.hosts else None
        self._host_by_address = {h.address: h for h in self.hosts}

    def __repr__(self) -> str:
        return f"NetnsSystem(hosts={len(self.hosts)}, machines={len(self.processes)})"

    def host_of(self, machine: Machine) -> NetnsHost:
        """The host ``machine`` runs on."""
        return self._host_by_address[machine.hostname]

    def _listen(self) -> tuple[socket.socket, str]:
        host = self.place
        if host is None:
            if self._next_host is None:
                raise RuntimeError("the netns system was given no hosts to start machines on")
            host = next(self._next_host)
        self._host_by_address.setdefault(host.address, host)
        return listen_in_netns(host), host.address

    def _spawn(self, b: B) -> Machine:
        machine = super()._spawn(b)
        cgroup = self.host_of(machine).cgroup
        if cgroup is not None:
            try:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(machine.pid))
            except OSError as exc:
                self.kill(machine)
                raise OSError(f"cannot put machine {machine.addr} in cgroup {cgroup}: {exc}") \
                    from exc
        return machine

    def _command(self, host: str) -> list[str]:
        netns = self._host_by_address[host].netns
        return [self.python, "-m", "bigpool.systems.netns", netns, *super()._command(host)]


def main(argv: Sequence[str]) -> None:
    """``python -m bigpool.systems.netns NAMESPACE COMMAND...``: run COMMAND in the namespace.

    Unlike ``ip netns exec``, only the network namespace changes: ``/sys`` (and the cgroup
    files under it, where a machine learns of OOM kills) stays as it was.
    """
    if len(argv) < 2:
        raise SystemExit("usage: python -m bigpool.systems.netns NAMESPACE COMMAND...")
    _setns(os.path.join(NETNS_DIR, argv[0]))
    os.execvp(argv[1], list(argv[1:]))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
