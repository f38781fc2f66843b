"""The EC2 system: each machine is an EC2 instance (spot first, or on-demand).

On the driver, :class:`EC2System` launches instances with boto3 (its standard credential chain
and region configuration), and for each one::

    RunInstances (spot; on-demand for what spot cannot supply)
      └─> wait for its address ──> Machine("https://<ip>:<port>/")   (returned to B)
            └─> hand-off thread: final leaf + bigpool zip to the first stage (ec2_boot)
                  └─> B boots the machine as any other: setbinary (only if the bundle is not
                      there), exec into the venv for the bundle's environment, services

A monitor thread enforces the cluster's TTL, notices instances that died (a reclaimed spot
instance), and terminates the instance of any machine that stopped. Shutdown terminates every
instance. Instances carry tags (``bigpool:cluster``, ``bigpool:driver-host``,
``bigpool:started``, ``bigpool:version``) by which ``python -m bigpool ec2 list`` and
``... cleanup`` find leftovers. See ``docs/ec2.md``.

On a machine, the node constructs ``EC2System()`` (no AWS call is made, boto3 is not imported)
for its :meth:`EC2System.bundle_python`, which puts each bundle's distributions in a venv keyed
by its environment (:mod:`.ec2_venv`) before the node execs into it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..h2rpc import BigpoolError
from . import KeepaliveConfig

if TYPE_CHECKING:
    from ..machine import B, Machine

__all__ = [
    "INSTANCE_TYPES",
    "BudgetExceededError",
    "ClusterExpiredError",
    "EC2Error",
    "EC2System",
    "InstanceLostError",
    "InstanceType",
    "choose_instance_type",
    "list_instances",
    "terminate_instances",
]

log = logging.getLogger(__name__)

DEFAULT_INSTANCE_TYPE = "m6i.large"
DEFAULT_PORT = 9443
DEFAULT_DISK_GIB = 40
DEFAULT_IMAGE = "debian-12"
# Public SSM parameters naming the current x86_64 image of each distribution.
IMAGE_PARAMETERS = {
    "debian-12": "/aws/service/debian/release/12/latest/amd64",
    "ubuntu-24.04": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "ubuntu-22.04": "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id",
}
# Errors of a spot launch that mean "no spot capacity now": fall back to on-demand.
SPOT_CAPACITY_ERRORS = frozenset({
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "UnfulfillableCapacity",
})
TAG_CLUSTER = "bigpool:cluster"
TAG_DRIVER_HOST = "bigpool:driver-host"
TAG_STARTED = "bigpool:started"
TAG_VERSION = "bigpool:version"
TAG_EXPIRES = "bigpool:expires"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# Booting an instance, installing Python and bigpool's dependencies takes minutes; the driver
# waits this long for a machine's supervisor by default (B's own default is shorter).
DEFAULT_BOOT_TIMEOUT = 900.0
# Keepalives cross the internet: fewer of them, and more patience, than for local machines.
DEFAULT_KEEPALIVE = KeepaliveConfig(period=10.0, timeout=120.0, rpc_timeout=30.0)
# How often the monitor checks TTL and instance states (each check is one DescribeInstances).
DEFAULT_MONITOR_INTERVAL = 30.0

ENV_TYPE = "BIGPOOL_EC2_TYPE"
ENV_ONDEMAND = "BIGPOOL_EC2_ONDEMAND"
ENV_DRIVER_ADDRESS = "BIGPOOL_EC2_DRIVER_ADDRESS"


class EC2Error(BigpoolError):
    """Base class of the EC2 system's errors (misconfiguration raises ``ValueError``)."""


class BudgetExceededError(EC2Error):
    """Starting more machines would take the cluster over its hourly budget; none started."""

    def __init__(self, requested: int, hourly: float, budget: float) -> None:
        self.requested = requested
        self.hourly = hourly
        self.budget = budget
        super().__init__(
            f"starting {requested} more instance(s) would cost ${hourly:.4f}/hour, over the "
            f"budget of ${budget:.4f}/hour (max_hourly_usd); no instance was started"
        )


class ClusterExpiredError(EC2Error):
    """The cluster's TTL ran out: its instances were terminated."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        super().__init__(f"the cluster's TTL of {ttl:g}s ran out; its instances were terminated")


class InstanceLostError(EC2Error):
    """A machine's instance stopped or terminated under it (a reclaimed spot instance, say)."""

    temporary = True

    def __init__(self, instance_id: str, state: str, reason: str = "") -> None:
        self.instance_id = instance_id
        self.state = state
        detail = f": {reason}" if reason else ""
        super().__init__(f"instance {instance_id} is {state}{detail}")


@dataclass(frozen=True)
class InstanceType:
    """An EC2 instance type: vCPUs, memory, and its on-demand price (USD/hour, Linux,
    us-east-1 list price; other regions differ by a few percent)."""

    name: str
    vcpus: int
    memory_gib: float
    price_usd: float


def _family(name: str, rows: Iterable[tuple[str, int, float, float]]) -> dict[str, InstanceType]:
    return {f"{name}.{size}": InstanceType(f"{name}.{size}", v, m, p) for size, v, m, p in rows}


INSTANCE_TYPES: dict[str, InstanceType] = {
    **_family("t3", [("medium", 2, 4, 0.0416), ("large", 2, 8, 0.0832),
                     ("xlarge", 4, 16, 0.1664), ("2xlarge", 8, 32, 0.3328)]),
    **_family("m5", [("large", 2, 8, 0.096), ("xlarge", 4, 16, 0.192), ("2xlarge", 8, 32, 0.384),
                     ("4xlarge", 16, 64, 0.768), ("8xlarge", 32, 128, 1.536),
                     ("12xlarge", 48, 192, 2.304), ("16xlarge", 64, 256, 3.072),
                     ("24xlarge", 96, 384, 4.608)]),
    **_family("m6i", [("large", 2, 8, 0.096), ("xlarge", 4, 16, 0.192), ("2xlarge", 8, 32, 0.384),
                      ("4xlarge", 16, 64, 0.768), ("8xlarge", 32, 128, 1.536),
                      ("12xlarge", 48, 192, 2.304), ("16xlarge", 64, 256, 3.072),
                      ("24xlarge", 96, 384, 4.608), ("32xlarge", 128, 512, 6.144)]),
    **_family("m7i", [("large", 2, 8, 0.1008), ("xlarge", 4, 16, 0.2016),
                      ("2xlarge", 8, 32, 0.4032), ("4xlarge", 16, 64, 0.8064),
                      ("8xlarge", 32, 128, 1.6128), ("12xlarge", 48, 192, 2.4192),
                      ("16xlarge", 64, 256, 3.2256), ("24xlarge", 96, 384, 4.8384),
                      ("48xlarge", 192, 768, 9.6768)]),
    **_family("c5", [("large", 2, 4, 0.085), ("xlarge", 4, 8, 0.17), ("2xlarge", 8, 16, 0.34),
                     ("4xlarge", 16, 32, 0.68), ("9xlarge", 36, 72, 1.53),
                     ("12xlarge", 48, 96, 2.04), ("18xlarge", 72, 144, 3.06),
                     ("24xlarge", 96, 192, 4.08)]),
    **_family("c6i", [("large", 2, 4, 0.085), ("xlarge", 4, 8, 0.17), ("2xlarge", 8, 16, 0.34),
                      ("4xlarge", 16, 32, 0.68), ("8xlarge", 32, 64, 1.36),
                      ("12xlarge", 48, 96, 2.04), ("16xlarge", 64, 128, 2.72),
                      ("24xlarge", 96, 192, 4.08), ("32xlarge", 128, 256, 5.44)]),
    **_family("c7i", [("large", 2, 4, 0.08925), ("xlarge", 4, 8, 0.1785),
                      ("2xlarge", 8, 16, 0.357), ("4xlarge", 16, 32, 0.714),
                      ("8xlarge", 32, 64, 1.428), ("12xlarge", 48, 96, 2.142),
                      ("16xlarge", 64, 128, 2.856), ("24xlarge", 96, 192, 4.284),
                      ("48xlarge", 192, 384, 8.568)]),
    **_family("r5", [("large", 2, 16, 0.126), ("xlarge", 4, 32, 0.252), ("2xlarge", 8, 64, 0.504),
                     ("4xlarge", 16, 128, 1.008), ("8xlarge", 32, 256, 2.016),
                     ("12xlarge", 48, 384, 3.024), ("16xlarge", 64, 512, 4.032),
                     ("24xlarge", 96, 768, 6.048)]),
    **_family("r6i", [("large", 2, 16, 0.126), ("xlarge", 4, 32, 0.252),
                      ("2xlarge", 8, 64, 0.504), ("4xlarge", 16, 128, 1.008),
                      ("8xlarge", 32, 256, 2.016), ("12xlarge", 48, 384, 3.024),
                      ("16xlarge", 64, 512, 4.032), ("24xlarge", 96, 768, 6.048),
                      ("32xlarge", 128, 1024, 8.064)]),
    **_family("r7i", [("large", 2, 16, 0.1323), ("xlarge", 4, 32, 0.2646),
                      ("2xlarge", 8, 64, 0.5292), ("4xlarge", 16, 128, 1.0584),
                      ("8xlarge", 32, 256, 2.1168), ("12xlarge", 48, 384, 3.1752),
                      ("16xlarge", 64, 512, 4.2336), ("24xlarge", 96, 768, 6.3504),
                      ("48xlarge", 192, 1536, 12.7008)]),
}


def choose_instance_type(
    instance_type: str | None = None,
    *,
    cpus: int | None = None,
    memory_gib: float | None = None,
) -> InstanceType:
    """The named type, or the cheapest with at least ``cpus`` vCPUs and ``memory_gib`` GiB.

    With neither, :data:`DEFAULT_INSTANCE_TYPE`. Raises ``ValueError`` for an unknown name, a
    name given together with requirements it does not meet, or requirements no type meets.
    """
    if cpus is not None and (not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1):
        raise ValueError(f"cpus must be a positive integer, not {cpus!r}")
    if memory_gib is not None and (not isinstance(memory_gib, int | float) or memory_gib <= 0):
        raise ValueError(f"memory_gib must be a positive number, not {memory_gib!r}")
    if instance_type is not None:
        typ = INSTANCE_TYPES.get(instance_type)
        if typ is None:
            raise ValueError(
                f"unknown instance type {instance_type!r}; known types: "
                f"{', '.join(sorted(INSTANCE_TYPES))}"
            )
        if (cpus is not None and typ.vcpus < cpus) or (
            memory_gib is not None and typ.memory_gib < memory_gib
        ):
            raise ValueError(
                f"instance type {instance_type} ({typ.vcpus} vCPUs, {typ.memory_gib:g} GiB) "
                f"does not have cpus={cpus} memory_gib={memory_gib}"
            )
        return typ
    if cpus is None and memory_gib is None:
        return INSTANCE_TYPES[DEFAULT_INSTANCE_TYPE]
    fits = [
        t for t in INSTANCE_TYPES.values()
        if (cpus is None or t.vcpus >= cpus) and (memory_gib is None or t.memory_gib >= memory_gib)
    ]
    if not fits:
        biggest_cpu = max(t.vcpus for t in INSTANCE_TYPES.values())
        biggest_mem = max(t.memory_gib for t in INSTANCE_TYPES.values())
        raise ValueError(
            f"no known instance type has cpus={cpus} and memory_gib={memory_gib} "
            f"(the largest have {biggest_cpu} vCPUs and {biggest_mem:g} GiB)"
        )
    return min(fits, key=lambda t: (t.price_usd, t.vcpus, t.memory_gib, t.name))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_route_address() -> str | None:
    """The IPv4 address of the interface carrying the default route (read locally, no traffic)."""
    import psutil

    try:
        with open("/proc/net/route") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for row in rows:
        if len(row) > 2 and row[1] == "00000000":
            for addr in psutil.net_if_addrs().get(row[0], []):
                if addr.family == socket.AF_INET:
                    return str(addr.address)
    return None


@dataclass
class _Instance:
    """The system's record of one launched instance."""

    instance_id: str
    market: str
    launched: float
    ip: str | None = None
    machine: Machine | None = None
    terminated: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


_live: weakref.WeakSet[EC2System] = weakref.WeakSet()


def _terminate_leftovers() -> None:
    for system in list(_live):
        with contextlib.suppress(Exception):
            system.terminate_all()


atexit.register(_terminate_leftovers)


class EC2System:
    """Machines on EC2 instances. See the module docstring and ``docs/ec2.md``.

    Args:
        instance_type: an EC2 type from :data:`INSTANCE_TYPES` (default ``$BIGPOOL_EC2_TYPE``,
            else the cheapest fitting ``cpus``/``memory_gib``, else ``m6i.large``).
        cpus, memory_gib: what each machine needs; the cheapest type that fits is used.
        ondemand: launch on-demand instances only (default ``$BIGPOOL_EC2_ONDEMAND``); otherwise
            spot first, and on-demand for whatever spot capacity cannot supply.
        region: the AWS region (default: boto3's configuration, e.g. ``$AWS_DEFAULT_REGION``).
        ami: the image; default the current ``image`` found through its public SSM parameter.
        image: ``debian-12`` (default), ``ubuntu-24.04`` or ``ubuntu-22.04``.
        subnet: the subnet to launch into (default: the default VPC's choice).
        security_group: an existing group to use as is; by default one named
            ``bigpool-<port>-<driver address>`` admitting only the RPC port from the driver's
            address is created (or reused).
        driver_address: the address instances see the driver connect from (default
            ``$BIGPOOL_EC2_DRIVER_ADDRESS``, else this host's default-route interface; never
            looked up on the internet).
        address: dial instances at their ``"public"`` (default) or ``"private"`` IP.
        port: the machines' RPC port.
        disk_gib: root volume size. tags: extra tags for every instance.
        max_hourly_usd: refuse to start machines that would take the cluster's on-demand
            price per hour over this (spot usually costs less; this is the bound).
        ttl: seconds after which the cluster's instances are terminated (also enforced on each
            instance by systemd, should the driver be gone).
        instance_profile: an IAM instance profile name for the instances. key_name: an EC2
            key pair (for ssh, when debugging).
        keepalive, boot_timeout: driver timings (see :class:`KeepaliveConfig`).
        endpoint_url, session: where boto3 sends requests / a ready ``boto3.Session``.
        monitor_interval: seconds between TTL and instance-state checks.
        poweroff: ``False`` keeps an instance up after bigpool on it exits (Bigmachine's
            "immortal" machines, for debugging a boot over ssh); the driver still terminates
            it on shutdown, and meanwhile it costs money.
        pip_args: extra arguments for the machines' pip when it installs the driver's
            distributions (``["--index-url", "https://pypi.example.com/simple"]``, say).
        address_for: a test seam: the IP to dial for an instance, given its DescribeInstances
            record (``None`` while it has none); default its public or private IP.
    """

    name = "ec2"

    def __init__(
        self,
        instance_type: str | None = None,
        *,
        cpus: int | None = None,
        memory_gib: float | None = None,
        ondemand: bool | None = None,
        region: str | None = None,
        ami: str | None = None,
        image: str = DEFAULT_IMAGE,
        subnet: str | None = None,
        security_group: str | None = None,
        driver_address: str | None = None,
        address: str = "public",
        port: int = DEFAULT_PORT,
        disk_gib: int = DEFAULT_DISK_GIB,
        tags: Mapping[str, str] | None = None,
        max_hourly_usd: float | None = None,
        ttl: float | None = None,
        instance_profile: str | None = None,
        key_name: str | None = None,
        keepalive: KeepaliveConfig | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        endpoint_url: str | None = None,
        session: Any = None,
        monitor_interval: float = DEFAULT_MONITOR_INTERVAL,
        address_for: Callable[[Mapping[str, Any]], str | None] | None = None,
        poweroff: bool = True,
        pip_args: Iterable[str] = (),
    ) -> None:
        if instance_type is None and cpus is None and memory_gib is None:
            instance_type = os.environ.get(ENV_TYPE) or None
        self.instance_type = choose_instance_type(instance_type, cpus=cpus, memory_gib=memory_gib)
        self.ondemand = _env_flag(ENV_ONDEMAND) if ondemand is None else bool(ondemand)
        if image not in IMAGE_PARAMETERS:
            raise ValueError(f"unknown image {image!r}; known: {', '.join(IMAGE_PARAMETERS)}")
        if address not in ("public", "private"):
            raise ValueError(f'address must be "public" or "private", not {address!r}')
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, not {port!r}")
        if not isinstance(disk_gib, int) or disk_gib < 8:
            raise ValueError(f"disk_gib must be an integer of at least 8, not {disk_gib!r}")
        if max_hourly_usd is not None:
            if not max_hourly_usd > 0:
                raise ValueError(f"max_hourly_usd must be positive, not {max_hourly_usd!r}")
            if max_hourly_usd < self.instance_type.price_usd:
                raise ValueError(
                    f"budget too low: max_hourly_usd=${max_hourly_usd:g} does not cover one "
                    f"{self.instance_type.name} (${self.instance_type.price_usd:g}/hour)"
                )
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        for what, value in (("boot_timeout", boot_timeout), ("monitor_interval", monitor_interval)):
            if not value > 0:
                raise ValueError(f"{what} must be positive, not {value!r}")
        if driver_address is not None:
            ipaddress.IPv4Address(driver_address)  # ValueError naming it if malformed
        self.region = region
        self.ami = ami
        self.image = image
        self.subnet = subnet
        self.security_group = security_group
        self.driver_address = driver_address
        self.address = address
        self.port = port
        self.disk_gib = disk_gib
        self.tags = dict(tags or {})
        self.max_hourly_usd = max_hourly_usd
        self.ttl = ttl
        self.instance_profile = instance_profile
        self.key_name = key_name
        self._keepalive = keepalive or DEFAULT_KEEPALIVE
        self.boot_timeout = boot_timeout
        self.endpoint_url = endpoint_url
        self.monitor_interval = monitor_interval
        self._session = session
        self._address_for = address_for
        self.poweroff = poweroff
        self.pip_args = [str(a) for a in pip_args]
        self._ec2: Any = None
        self._ssm: Any = None
        self._b: B | None = None
        self.cluster_id = ""
        self.started_at = 0.0
        self.instances: dict[str, _Instance] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._monitor: threading.Thread | None = None
        self._user_data: str | None = None
        self._spec: dict[str, Any] | None = None
        self._launch_lock = threading.Lock()
        self._expired = False

    def __repr__(self) -> str:
        market = "on-demand" if self.ondemand else "spot"
        return (f"EC2System({self.instance_type.name}, {market}, cluster={self.cluster_id or '-'}, "
                f"instances={len(self.instances)})")

    # System protocol ---------------------------------------------------------------------------

    def keepalive_config(self) -> KeepaliveConfig:
        return self._keepalive

    def maxprocs(self) -> int:
        return self.instance_type.vcpus

    def needs_bundle(self) -> bool:
        return True

    def init(self, b: B) -> None:
        """Connect to AWS and resolve the driver's address; start the monitor. Driver only."""
        if b.authority is None:
            return  # on a machine: nothing to connect to
        self._b = b
        b.boot_timeout = max(b.boot_timeout, self.boot_timeout)
        self.cluster_id = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        if self.driver_address is None:
            self.driver_address = os.environ.get(ENV_DRIVER_ADDRESS) or None
        if self.driver_address is None and self.security_group is None:
            found = _default_route_address()
            if found is None:
                raise ValueError(
                    "cannot tell the driver's address: pass driver_address= (or set "
                    f"${ENV_DRIVER_ADDRESS}), or a security_group= of your own"
                )
            if self.address == "public" and ipaddress.IPv4Address(found).is_private:
                raise ValueError(
                    f"this host's address {found} is private, so instances would see the driver "
                    "come from another (NAT) address: pass driver_address= with the address AWS "
                    'sees, or address="private" when the driver runs in the same VPC'
                )
            self.driver_address = found
        self._connect()
        _live.add(self)
        self._monitor = threading.Thread(target=self._monitor_loop, name="bigpool-ec2-monitor",
                                         daemon=True)
        self._monitor.start()

    def _connect(self) -> None:
        import boto3
        from botocore.config import Config

        session = self._session or boto3.session.Session(region_name=self.region)
        config = Config(retries={"mode": "standard", "max_attempts": 5})
        self._ec2 = session.client("ec2", endpoint_url=self.endpoint_url, config=config)
        self._ssm = session.client("ssm", endpoint_url=self.endpoint_url, config=config)
        self.region = self._ec2.meta.region_name

    @property
    def ec2(self) -> Any:
        """The boto3 EC2 client (after :meth:`init`); tests hook its events."""
        return self._ec2

    async def start(self, b: B, count: int) -> list[Machine]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self._start, b, count)

    def _start(self, b: B, count: int) -> list[Machine]:
        from ..machine import Machine

        if self._ec2 is None or b.authority is None:
            raise RuntimeError("only an initialised driver can start EC2 machines")
        if self._expired:
            raise ClusterExpiredError(self.ttl or 0)
        price = self.instance_type.price_usd
        # One launch at a time: concurrent starts must neither both pass the budget check nor
        # race to make the security group.
        with self._launch_lock:
            if self.max_hourly_usd is not None:
                hourly = price * (len(self._live_records()) + count)
                if hourly > self.max_hourly_usd + 1e-9:
                    raise BudgetExceededError(count, hourly, self.max_hourly_usd)
            if self._spec is None:
                self._spec = self._launch_spec(b)
            launched = self._launch(count, self._spec)
        ready = self._wait_for_addresses(launched)
        machines = []
        for record in ready:
            assert record.ip is not None
            addr = f"https://{record.ip}:{self.port}/"
            machine = Machine(addr, maxprocs=self.instance_type.vcpus)
            machine.system_handle = record
            record.machine = machine
            credentials = b.authority.issue(f"machine {addr}", ips=[record.ip])
            record.thread = threading.Thread(
                target=self._hand_off, args=(b, record, credentials),
                name=f"bigpool-ec2-boot-{record.instance_id}", daemon=True,
            )
            record.thread.start()
            machines.append(machine)
        if self._expired_now():  # the TTL ran out while these started (the monitor's thread)
            for machine in machines:
                machine._fail(ClusterExpiredError(self.ttl or 0))
        return machines

    def _expired_now(self) -> bool:
        return self._expired

    def _live_records(self) -> list[_Instance]:
        with self._lock:
            return [r for r in self.instances.values() if not r.terminated]

    # launching -----------------------------------------------------------------------------------

    def _launch_spec(self, b: B) -> dict[str, Any]:
        from .. import __version__

        ami = self.ami or self._resolve_ami()
        image = self._ec2.describe_images(ImageIds=[ami])["Images"]
        if not image:
            raise ValueError(f"AMI {ami} does not exist in {self.region}")
        root_device = image[0].get("RootDeviceName") or "/dev/xvda"
        groups = [self.security_group or self._ensure_security_group()]
        tags = {
            "Name": f"bigpool {self.cluster_id}",
            TAG_CLUSTER: self.cluster_id,
            TAG_DRIVER_HOST: socket.gethostname(),
            TAG_STARTED: _iso(self.started_at),
            TAG_VERSION: __version__,
            **({TAG_EXPIRES: _iso(self.started_at + self.ttl)} if self.ttl else {}),
            **self.tags,
        }
        spec: dict[str, Any] = {
            "ImageId": ami,
            "InstanceType": self.instance_type.name,
            "UserData": self._make_user_data(b),
            "SecurityGroupIds": groups,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "BlockDeviceMappings": [{
                "DeviceName": root_device,
                "Ebs": {"VolumeSize": self.disk_gib, "VolumeType": "gp3",
                        "DeleteOnTermination": True},
            }],
            "TagSpecifications": [
                {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
                for kind in ("instance", "volume")
            ],
        }
        if self.subnet:
            spec["SubnetId"] = self.subnet
        if self.instance_profile:
            spec["IamInstanceProfile"] = {"Name": self.instance_profile}
        if self.key_name:
            spec["KeyName"] = self.key_name
        return spec

    def _resolve_ami(self) -> str:
        parameter = IMAGE_PARAMETERS[self.image]
        value = self._ssm.get_parameter(Name=parameter)["Parameter"]["Value"]
        self.ami = str(value)
        return self.ami

    def _vpc_id(self) -> str:
        if self.subnet:
            subnets = self._ec2.describe_subnets(SubnetIds=[self.subnet])["Subnets"]
            return str(subnets[0]["VpcId"])
        vpcs = self._ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ValueError(f"region {self.region} has no default VPC: pass subnet=")
        return str(vpcs[0]["VpcId"])

    def _ensure_security_group(self) -> str:
        """The group admitting only the RPC port from the driver's address: found or made."""
        from botocore.exceptions import ClientError

        assert self.driver_address is not None
        name = f"bigpool-{self.port}-{self.driver_address.replace('.', '-')}"
        vpc = self._vpc_id()
        found = self._ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]},
        ])["SecurityGroups"]
        if found:
            group_id = str(found[0]["GroupId"])
        else:
            group_id = str(self._ec2.create_security_group(
                GroupName=name, VpcId=vpc,
                Description=f"bigpool machines: port {self.port} from {self.driver_address} only",
                TagSpecifications=[{"ResourceType": "security-group",
                                    "Tags": [{"Key": "bigpool", "Value": "true"}]}],
            )["GroupId"])
        try:
            self._ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[{
                "IpProtocol": "tcp", "FromPort": self.port, "ToPort": self.port,
                "IpRanges": [{"CidrIp": f"{self.driver_address}/32",
                              "Description": "bigpool driver"}],
            }])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                raise
        return group_id

    def _make_user_data(self, b: B) -> str:
        from ..h2rpc.loop import ENV_EVENT_LOOP
        from ..node import ENV_KEEPALIVE_TIMEOUT, ENV_MAXPROCS, ENV_SYSTEM
        from .ec2_boot import BOOT_NAME, machine_requirements, user_data
        from .ec2_venv import ENV_PIP_ARGS

        if self._user_data is None:
            assert b.authority is not None
            boot = b.authority.issue(
                "bigpool machine (boot)", dns=[BOOT_NAME],
                lifetime=datetime.timedelta(seconds=self.boot_timeout + 3600),
                client_auth=False,  # user-data is readable on the instance: it must call no one
            )
            node_env = {
                ENV_MAXPROCS: str(self.instance_type.vcpus),
                ENV_SYSTEM: self.name,
                ENV_KEEPALIVE_TIMEOUT: str(self.boot_timeout),
                ENV_PIP_ARGS: json.dumps(self.pip_args),
            }
            if os.environ.get(ENV_EVENT_LOOP):
                # The driver's choice of event loop holds on its machines, as it does for
                # local ones (which inherit the environment).
                node_env[ENV_EVENT_LOOP] = os.environ[ENV_EVENT_LOOP]
            self._user_data = user_data(
                boot_credentials=boot,
                port=self.port,
                boot_timeout=self.boot_timeout,
                node_env=node_env,
                requirements=machine_requirements(),
                ttl=self.ttl,
                poweroff=self.poweroff,
                comment=f"cluster {self.cluster_id}",
            )
        return self._user_data

    def _run(self, spec: Mapping[str, Any], count: int, spot: bool) -> list[_Instance]:
        request = dict(spec, MinCount=1, MaxCount=count)
        if spot:
            request["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time",
                                "InstanceInterruptionBehavior": "terminate"},
            }
        reply = self._ec2.run_instances(**request)
        now = time.time()
        records = [_Instance(str(i["InstanceId"]), "spot" if spot else "on-demand", now)
                   for i in reply.get("Instances", [])]
        with self._lock:
            for r in records:
                self.instances[r.instance_id] = r
        return records

    def _launch(self, count: int, spec: Mapping[str, Any]) -> list[_Instance]:
        """Spot first (unless on-demand was asked for); on-demand for what spot did not supply."""
        from botocore.exceptions import ClientError

        records: list[_Instance] = []
        if not self.ondemand:
            try:
                records = self._run(spec, count, spot=True)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in SPOT_CAPACITY_ERRORS:
                    raise
                log.warning("bigpool ec2: no spot capacity for %s (%s); launching on-demand",
                            self.instance_type.name, code)
        if len(records) < count:
            try:
                records += self._run(spec, count - len(records), spot=False)
            except ClientError as exc:
                if not records:
                    raise
                # As Bigmachine: what spot gave is kept; B gets fewer machines than asked.
                log.warning("bigpool ec2: on-demand launch failed (%s); starting %d of %d",
                            exc, len(records), count)
        return records

    def _wait_for_addresses(self, records: list[_Instance]) -> list[_Instance]:
        """Poll until each instance runs and has its address; terminate all on failure."""
        ids = [r.instance_id for r in records]
        key = "PublicIpAddress" if self.address == "public" else "PrivateIpAddress"
        deadline = time.monotonic() + self.boot_timeout
        delay = 0.25
        try:
            while True:
                pending = [r for r in records if r.ip is None]
                if not pending:
                    return records
                for instance in self._describe_new([r.instance_id for r in pending]):
                    record = self.instances[instance["InstanceId"]]
                    state = instance.get("State", {}).get("Name", "")
                    if state in ("shutting-down", "terminated", "stopping", "stopped"):
                        reason = instance.get("StateReason", {}).get("Message", "")
                        raise InstanceLostError(record.instance_id, state, reason)
                    if state == "running":
                        ip = self._address_for(instance) if self._address_for else instance.get(key)
                        record.ip = str(ip) if ip else None
                if self._stopped.is_set():
                    if self._expired and self.ttl is not None:
                        raise ClusterExpiredError(self.ttl)
                    raise EC2Error("the EC2 system was shut down while instances were starting")
                if time.monotonic() + delay > deadline:
                    raise EC2Error(f"instances {ids} had no {self.address} address within "
                                   f"{self.boot_timeout:g}s")
                self._stopped.wait(delay)
                delay = min(delay * 1.5, 5.0)
        except BaseException:
            self._terminate(ids)
            raise

    def _describe_new(self, ids: list[str]) -> list[dict[str, Any]]:
        """:meth:`_describe`, but nothing yet for instances EC2 does not know yet: right after
        RunInstances, DescribeInstances may say they do not exist (it is eventually
        consistent)."""
        from botocore.exceptions import ClientError

        try:
            return self._describe(ids)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                return []
            raise

    def _describe(self, ids: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        paginator = self._ec2.get_paginator("describe_instances")
        for page in paginator.paginate(InstanceIds=ids):
            for reservation in page.get("Reservations", []):
                out.extend(reservation.get("Instances", []))
        return out

    def _hand_off(self, b: B, record: _Instance, credentials: Any) -> None:
        from ..machine import State
        from .ec2_boot import hand_off

        machine = record.machine
        assert machine is not None and record.ip is not None
        try:
            hello = hand_off(
                record.ip, self.port, driver_credentials=b.credentials,
                machine_credentials=credentials, timeout=self.boot_timeout,
                cancelled=lambda: (self._stopped.is_set() or record.terminated
                                   or machine.state is State.STOPPED),
            )
        except BaseException as exc:
            expired = self._expired and self.ttl is not None
            machine._fail(ClusterExpiredError(self.ttl or 0) if expired else exc)
            try:
                self._terminate([record.instance_id])
            except EC2Error as err:
                log.error("bigpool ec2: %s", err)
            return
        mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if hello.get("python") != mine:
            log.warning("bigpool ec2: machine %s runs Python %s, the driver %s; functions "
                        "pickled by value may not load there", record.instance_id,
                        hello.get("python"), mine)

    # stopping ----------------------------------------------------------------------------------

    def _terminate(self, ids: list[str]) -> None:
        """Terminate the instances of ``ids`` not already terminated.

        Raises :class:`EC2Error` naming them (and the cleanup command) if EC2 refuses: an
        instance left running costs money, so this is never silent.

        An instance counts as terminated only once EC2 has accepted its termination, never
        while a request is under way: threads terminate concurrently (shutdown, the monitor, a
        hand-off thread whose machine stopped, atexit), and a caller that took another's
        request for done would return quietly should that request fail. So each caller asks
        EC2 itself (TerminateInstances is idempotent) and learns the outcome.
        """
        with self._lock:
            ids = [i for i in ids if i in self.instances and not self.instances[i].terminated]
        if not ids or self._ec2 is None:
            return
        try:
            terminate_instances(self._ec2, ids)
        except Exception as exc:
            with self._lock:
                left = [i for i in ids if not self.instances[i].terminated]
            if not left:  # another caller's request for them went through meanwhile
                return
            raise EC2Error(
                f"could not terminate instances {', '.join(left)}: {type(exc).__name__}: "
                f"{exc}; run: python -m bigpool ec2 cleanup --cluster {self.cluster_id} --yes"
            ) from exc
        with self._lock:
            for i in ids:
                self.instances[i].terminated = True

    def terminate_all(self) -> None:
        """Terminate every instance this system launched (idempotent, from any thread)."""
        self._stopped.set()
        with self._lock:
            ids = list(self.instances)
        self._terminate(ids)

    async def shutdown(self) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self.terminate_all()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(10)
        with self._lock:
            threads = [r.thread for r in self.instances.values() if r.thread is not None]
        for thread in threads:
            thread.join(10)
        _live.discard(self)

    def _monitor_loop(self) -> None:
        while not self._stopped.wait(self.monitor_interval):
            try:
                self.check()
            except Exception as exc:  # a failed check is retried at the next interval
                log.warning("bigpool ec2: monitor check failed: %s: %s", type(exc).__name__, exc)

    def check(self) -> None:
        """One monitor pass: TTL, instances that died, machines that stopped. The monitor
        thread calls it every ``monitor_interval`` seconds."""
        from ..machine import State

        if self.ttl is not None and time.time() >= self.started_at + self.ttl:
            self._expire()
            return
        records = self._live_records()
        for record in records:
            if record.machine is not None and record.machine.state is State.STOPPED:
                self._terminate([record.instance_id])
        records = self._live_records()
        if not records:
            return
        for instance in self._describe([r.instance_id for r in records]):
            state = instance.get("State", {}).get("Name", "")
            if state in ("shutting-down", "terminated", "stopping", "stopped"):
                record = self.instances[instance["InstanceId"]]
                with self._lock:
                    record.terminated = True
                if record.machine is not None:
                    reason = instance.get("StateReason", {}).get("Message", "")
                    record.machine._fail(InstanceLostError(record.instance_id, state, reason))

    def _expire(self) -> None:
        assert self.ttl is not None
        self._expired = True
        err = ClusterExpiredError(self.ttl)
        log.warning("bigpool ec2: %s", err)
        with self._lock:
            machines = [r.machine for r in self.instances.values() if r.machine is not None]
        for machine in machines:
            machine._fail(err)
        self.terminate_all()

    # machine side ------------------------------------------------------------------------------

    def bundle_python(self, bundle_path: str) -> str:
        """On a machine: the Python of the venv for the stored bundle at ``bundle_path``,
        made first if need be (see :mod:`.ec2_venv`); this Python outside EC2 machines."""
        from ..bundle import read_bundle
        from .ec2_venv import ENV_VENV_DIR, prepare_venv

        root = os.environ.get(ENV_VENV_DIR)
        if not root:
            return sys.executable
        bundle = read_bundle(bundle_path)
        return prepare_venv(bundle.distributions, bundle.python, root)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def list_instances(
    ec2: Any, *, cluster: str | None = None, states: Iterable[str] = LIVE_STATES
) -> list[dict[str, Any]]:
    """bigpool's instances visible to the EC2 client ``ec2``: every instance tagged
    ``bigpool:cluster`` (or that cluster), in ``states``, as DescribeInstances gives them."""
    filters: list[dict[str, Any]] = [{"Name": "instance-state-name", "Values": list(states)}]
    if cluster:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
    else:
        filters.append({"Name": "tag-key", "Values": [TAG_CLUSTER]})
    out: list[dict[str, Any]] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            out.extend(reservation.get("Instances", []))
    return out


def terminate_instances(ec2: Any, ids: list[str]) -> None:
    """Terminate ``ids`` (in batches of 500, EC2's limit per call)."""
    for i in range(0, len(ids), 500):
        ec2.terminate_instances(InstanceIds=ids[i : i + 500])


def instance_tags(instance: Mapping[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}

