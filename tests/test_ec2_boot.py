"""An EC2 machine's whole boot, for real, with moto standing in for EC2.

When moto first reports an instance running with its private IP, the test makes a network
namespace that owns that IP (a veth pair to this host, whose end carries the driver's address)
and runs in it the user-data EC2 holds for the instance, byte for byte, in test mode
(``BIGPOOL_EC2_TEST_ROOT``: files under a temporary root, this test's Python instead of apt and
pip, the power-off recorded in a file). The driver then boots the machine as it would on EC2:
hand-off to the first stage, bundle upload, venv, exec, RUNNING, a service call; a second
machine on the same root skips the upload; after shutdown each machine's watchdog ends it.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from ec2_probe import Probe, netns, square
from ec2_support import REGION, guarded_session, moto_ami, moto_env, user_data_of
from loop_support import expected_loop_name
from pool_support import wait_until

import bigpool
from bigpool import BigPool
from bigpool.bundle import current_bundle
from bigpool.machine import State
from bigpool.node import EXIT_NO_KEEPALIVE
from bigpool.systems import KeepaliveConfig
from bigpool.systems.ec2 import EC2System, list_instances

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or sys.platform != "linux",
    reason="needs root and iproute2 to make network namespaces",
)

# The driver's end of every veth pair (TEST-NET-2: routed nowhere from here).
DRIVER = "198.51.100.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Instances:
    """Network namespaces standing in for instances, each running its user-data."""

    def __init__(self, ec2: Any, root: str) -> None:
        self.ec2 = ec2
        self.root = root
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started: dict[str, str] = {}

    def on_describe(self, parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                if (inst["State"]["Name"] == "running" and inst.get("PrivateIpAddress")
                        and inst["InstanceId"] not in self.started):
                    self.boot(inst["InstanceId"], inst["PrivateIpAddress"])

    def boot(self, instance_id: str, ip: str) -> None:
        n = len(self.started)
        self.started[instance_id] = ip
        ns, host, peer = f"bpec2-{self.tag}-{n}", f"bpe{self.tag}h{n}", f"bpe{self.tag}n{n}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", host, "type", "veth", "peer", "name", peer)
        self.links.append(host)
        _ip("link", "set", peer, "netns", ns)
        _ip("addr", "add", f"{DRIVER}/32", "dev", host)
        _ip("link", "set", host, "up")
        _ip("route", "add", f"{ip}/32", "dev", host, "src", DRIVER)
        _ip("-n", ns, "addr", "add", f"{ip}/32", "dev", peer)
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", f"{DRIVER}/32", "dev", peer)
        script = os.path.join(self.root, f"user-data-{instance_id}.sh")
        with open(script, "w") as f:
            f.write(user_data_of(self.ec2, instance_id))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.root,
            "BIGPOOL_EC2_TEST_ROOT": self.root,
            "BIGPOOL_EC2_TEST_PYTHON": sys.executable,
        }
        log = open(os.path.join(self.root, f"{instance_id}.log"), "wb")  # noqa: SIM115
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "bash", script], env=env, stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True,
        ))
        log.close()

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".log"):
                with open(os.path.join(self.root, name), errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
            proc.wait(10)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)


def _boot_leaf_cannot_call(ec2: Any, instances: Instances, addr: str, b: Any) -> None:
    """The boot leaf is in the user-data, readable by anything on the instance: it serves the
    first stage but is no client certificate, so the machine's server refuses it. A leaf of the
    same CA that is one gets the server's HTTP/2 settings."""
    import socket
    import ssl

    from ec2_support import user_data_files

    from bigpool.h2rpc import Credentials, parse_address

    files = user_data_files(user_data_of(ec2, next(iter(instances.started))))
    boot = Credentials(files["boot-cert.pem"], files["boot-key.pem"], files["ca.pem"])
    host, port = parse_address(addr)

    def first_bytes(credentials: Credentials) -> bytes:
        ctx = credentials.client_context()
        with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(
            raw, server_hostname=host
        ) as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(9)  # the server's SETTINGS frame header, or its refusal

    try:
        refused = first_bytes(boot)
    except (ssl.SSLError, ConnectionError) as exc:
        refused = repr(exc).encode()
    assert refused[3:4] != b"\x04", refused  # no SETTINGS: an alert, a reset or end of stream
    assert first_bytes(b.authority.issue("another client"))[3] == 0x4  # SETTINGS


@pytest.fixture
def moto() -> Iterator[str]:
    with moto_env() as url:
        yield url


@pytest.fixture
def instances(moto: str, tmp_path: Any) -> Iterator[Instances]:
    """Namespaces that boot whatever the EC2 system launches; all gone after the test."""
    ec2 = guarded_session(moto).client("ec2", endpoint_url=moto)
    instances = Instances(ec2, str(tmp_path))
    try:
        yield instances
    finally:
        instances.close()


def make_system(moto: str, instances: Instances) -> EC2System:
    session = guarded_session(moto)
    session.events.register("after-call.ec2.DescribeInstances", instances.on_describe)
    return EC2System(
        session=session, endpoint_url=moto, region=REGION, ami=moto_ami(instances.ec2),
        address="private", driver_address=DRIVER, port=9443,
        keepalive=KeepaliveConfig(period=0.5, timeout=4.0, rpc_timeout=2.0),
        boot_timeout=60.0,
    )


def powered_off(instances: Instances) -> list[str]:
    """Wait for every machine to end by its own watchdog (the driver is gone); the statuses
    the boot scripts recorded in place of powering off."""
    wait_until(lambda: all(p.poll() is not None for p in instances.procs), 30,
               "the machines' watchdogs to end them")
    with open(os.path.join(instances.root, "poweroff")) as f:
        return f.read().split()


def test_user_data_boots_a_machine_in_a_namespace(moto: str, instances: Instances) -> None:
    root, ec2 = instances.root, instances.ec2
    system = make_system(moto, instances)
    b = bigpool.start(system=system)
    try:
        [m1] = b.start(1, services={"Probe": Probe()})
        assert m1.wait(State.RUNNING, timeout=90) is State.RUNNING, (m1.err(), instances.logs())
        here = m1.call("Probe.where", timeout=30)
        assert here["netns"] != os.stat("/proc/self/ns/net").st_ino  # it runs in the namespace
        venvs = os.path.join(root, "var/lib/bigpool/venvs")
        assert os.path.dirname(here["prefix"]) == venvs  # exec'd into the environment's venv
        assert here["digest"] == current_bundle().digest
        # The base venv's uvloop reaches the exec'd node through the bundle's venv.
        assert m1.call("Supervisor.info", timeout=30)["event_loop"] == expected_loop_name()
        assert b.bundle_uploads == 1
        assert m1.call("Probe.add", (2, 3)) == 5
        _boot_leaf_cannot_call(ec2, instances, m1.addr, b)
        [venv] = os.listdir(venvs)
        marker = os.path.join(venvs, venv, ".bigpool-ready")
        made = os.stat(marker).st_mtime_ns

        [m2] = b.start(1, services={"Probe": Probe()})  # a second instance, same disk
        assert m2.wait(State.RUNNING, timeout=90) is State.RUNNING, (m2.err(), instances.logs())
        assert m2.call("Probe.where", timeout=30)["prefix"] == here["prefix"]
        assert b.bundle_uploads == 1  # the bundle was there: no upload
        assert os.stat(marker).st_mtime_ns == made  # nor a new venv
        assert len(os.listdir(os.path.join(root, "var/lib/bigpool/bootstrap"))) == 1
        assert len(instances.started) == 2
        # The install branch test mode skips (apt, pip) is at least valid bash.
        for script in (os.path.join(root, "var/lib/bigpool/boot.sh"),
                       os.path.join(root, f"user-data-{next(iter(instances.started))}.sh")):
            subprocess.run(["bash", "-n", script], check=True, timeout=30)
    finally:
        b.shutdown()
    # Terminated in EC2; the processes here end by their own watchdog, as on an instance
    # whose driver went away, and "power off".
    assert powered_off(instances) == [str(EXIT_NO_KEEPALIVE)] * 2, instances.logs()
    assert "no keepalive from the driver in time" in instances.logs()
    assert list_instances(ec2, cluster=system.cluster_id, states=("pending", "running")) == []
    gc.collect()  # a connection this test leaked warns here, not in some later test


def test_bigpool_maps_over_an_ec2_machine(moto: str, instances: Instances) -> None:
    system = make_system(moto, instances)
    with BigPool(processes=2, system=system) as p:
        assert p.map(square, range(20)) == [x * x for x in range(20)]
        assert p.apply(netns) != os.stat("/proc/self/ns/net").st_ino
        assert len(p.machines) == 1 and p.machines[0].maxprocs == system.maxprocs() == 2
    assert powered_off(instances) == [str(EXIT_NO_KEEPALIVE)], instances.logs()
    gc.collect()
