"""The EC2 system against moto in server mode (real HTTP on loopback; no AWS account).

Machines here are never reached: ``address_for`` points the driver at a loopback port where
nothing listens, so no packet leaves this host. The real boot, with the user-data executed in a
network namespace, is in ``test_ec2_boot.py``.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from ec2_support import (
    REGION,
    guarded_session,
    moto_ami,
    moto_env,
    user_data_files,
    user_data_of,
)
from pool_support import wait_until

import bigpool
from bigpool.machine import State
from bigpool.systems.ec2 import (
    INSTANCE_TYPES,
    TAG_CLUSTER,
    TAG_DRIVER_HOST,
    TAG_STARTED,
    TAG_VERSION,
    BudgetExceededError,
    ClusterExpiredError,
    EC2Error,
    EC2System,
    choose_instance_type,
    instance_tags,
    list_instances,
)
from bigpool.systems.ec2_boot import MAX_USER_DATA

DRIVER = "127.0.0.1"


class Echo:
    def echo(self, x: Any) -> Any:
        return x


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_env() as url:
        yield url


@pytest.fixture
def ec2(moto: str) -> Any:
    return guarded_session(moto).client("ec2", endpoint_url=moto)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_system(moto: str, ec2: Any, **options: Any) -> EC2System:
    options.setdefault("ami", moto_ami(ec2))
    options.setdefault("boot_timeout", 30.0)
    options.setdefault("port", _dead_port())
    options.setdefault("session", guarded_session(moto))
    return EC2System(
        endpoint_url=moto, region=REGION,
        driver_address=DRIVER, address_for=lambda _: "127.0.0.1", **options,
    )


def cluster_instances(ec2: Any, system: EC2System, states: tuple[str, ...] = ("pending", "running")
                      ) -> list[dict[str, Any]]:
    return list_instances(ec2, cluster=system.cluster_id, states=states)


# choosing types and checking options ---------------------------------------------------------


def test_cheapest_fitting_type_and_maxprocs() -> None:
    assert choose_instance_type().name == "m6i.large"
    typ = choose_instance_type(cpus=16)
    fits = [t for t in INSTANCE_TYPES.values() if t.vcpus >= 16]
    assert typ.price_usd == min(t.price_usd for t in fits) and typ.vcpus >= 16
    assert choose_instance_type(memory_gib=100).memory_gib >= 100
    assert choose_instance_type(cpus=2, memory_gib=16).name in ("r5.large", "r6i.large")
    assert EC2System(cpus=8).maxprocs() == 8
    assert EC2System("c6i.4xlarge").maxprocs() == 16


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"instance_type": "m9.huge"}, "unknown instance type 'm9.huge'"),
    ({"cpus": 1000}, "no known instance type has cpus=1000"),
    ({"instance_type": "t3.medium", "memory_gib": 64}, "does not have"),
    ({"cpus": 0}, "cpus must be a positive integer"),
    ({"max_hourly_usd": 0.01}, "budget too low"),
    ({"ttl": -1}, "ttl must be a positive"),
    ({"image": "windows"}, "unknown image 'windows'"),
    ({"address": "ipv6"}, 'address must be "public" or "private"'),
    ({"driver_address": "not-an-ip"}, "not-an-ip"),
])
def test_bad_options_say_what_is_wrong(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EC2System(**kwargs)


def test_flags_and_environment_choose_type_and_market(
    moto: str, ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bigpool.add_arguments(parser)
    args = parser.parse_args(["--bigpool-system", "ec2", "--bigpool-ec2-type", "c6i.xlarge",
                              "--bigpool-ec2-ondemand"])
    b = bigpool.start(args=args, session=guarded_session(moto), endpoint_url=moto,
                      driver_address=DRIVER, ami=moto_ami(ec2))
    try:
        assert isinstance(b.system, EC2System)
        assert b.system.instance_type.name == "c6i.xlarge" and b.system.ondemand
        assert b.system.maxprocs() == 4
    finally:
        b.shutdown()
    monkeypatch.setenv("BIGPOOL_EC2_TYPE", "r6i.xlarge")
    monkeypatch.setenv("BIGPOOL_EC2_ONDEMAND", "1")
    system = EC2System()
    assert system.instance_type.name == "r6i.xlarge" and system.ondemand


def test_driver_address_from_the_default_route_never_from_the_internet(
    moto: str, ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ipaddress

    import psutil

    from bigpool.systems.ec2 import _default_route_address

    monkeypatch.delenv("BIGPOOL_EC2_DRIVER_ADDRESS", raising=False)
    found = _default_route_address()
    if found is None:
        pytest.skip("this host has no IPv4 default route")
    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    assert found in mine and not ipaddress.IPv4Address(found).is_loopback
    options = {"session": guarded_session(moto), "endpoint_url": moto, "ami": moto_ami(ec2)}
    b = bigpool.start(system=EC2System(address="private", **options))
    try:
        assert b.system.driver_address == found  # type: ignore[attr-defined]
    finally:
        b.shutdown()
    if ipaddress.IPv4Address(found).is_private:
        # Dialling public IPs from behind NAT: the group would admit the wrong address.
        with pytest.raises(ValueError, match="pass driver_address="):
            bigpool.start(system=EC2System(address="public", **options))


# launching against moto -----------------------------------------------------------------------


def test_launch_type_tags_user_data_security_group_and_terminate(
    moto: str, ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BIGPOOL_EVENT_LOOP", "asyncio")  # the driver's choice reaches machines
    system = make_system(moto, ec2, cpus=4, tags={"team": "bio"}, pip_args=["--no-index"])
    b = bigpool.start(system=system)
    try:
        machines = b.start(2, services={"Echo": Echo()})
        assert [m.maxprocs for m in machines] == [4, 4]
        instances = cluster_instances(ec2, system)
        assert len(instances) == 2
        # Moto launches MinCount (1) of a spot request for MaxCount 2, as a real region short of
        # spot capacity may: the rest comes on-demand.
        markets = {r.instance_id: r.market for r in system.instances.values()}
        assert sorted(markets.values()) == ["on-demand", "spot"]
        for inst in instances:
            assert inst["InstanceType"] == system.instance_type.name
            lifecycle = inst.get("InstanceLifecycle", "on-demand")
            assert lifecycle == markets[inst["InstanceId"]]
            tags = instance_tags(inst)
            assert tags[TAG_CLUSTER] == system.cluster_id
            assert tags[TAG_DRIVER_HOST] == socket.gethostname()
            assert tags[TAG_VERSION] == bigpool.__version__
            assert tags[TAG_STARTED].endswith("Z") and tags["team"] == "bio"
            attr = ec2.describe_instance_attribute(
                InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
            assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        script = user_data_of(ec2, instances[0]["InstanceId"])
        assert len(script.encode()) <= MAX_USER_DATA
        files = user_data_files(script)
        assert set(files) == {"stage1.py", "boot.json", "boot-cert.pem", "boot-key.pem", "ca.pem"}
        node_env = json.loads(files["boot.json"])["env"]
        assert node_env["BIGPOOL_MAXPROCS"] == "4" and node_env["BIGPOOL_SYSTEM_NAME"] == "ec2"
        assert json.loads(node_env["BIGPOOL_PIP_ARGS"]) == ["--no-index"]
        assert node_env["BIGPOOL_EVENT_LOOP"] == "asyncio"
        # The base venv gets uvloop at the driver's version, as the other dependencies.
        assert f"uvloop=={importlib.metadata.version('uvloop')}" in script
        assert b.authority is not None
        assert files["ca.pem"] == b.authority.cert_pem
        ca_key = b.authority._key.private_numbers().private_value
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        leaf_key = load_pem_private_key(files["boot-key.pem"], None)
        assert leaf_key.private_numbers().private_value != ca_key  # type: ignore[union-attr]
        assert script.count("PRIVATE KEY") == 0  # only the gzipped boot leaf key, nothing in clear
        assert "ExecStopPost=/bin/systemctl poweroff" in script
        assert "RuntimeMaxSec=infinity" in script

        group_id = instances[0]["SecurityGroups"][0]["GroupId"]
        group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        assert group["GroupName"] == f"bigpool-{system.port}-127-0-0-1"
        rules = group["IpPermissions"]
        assert len(rules) == 1 and rules[0]["IpProtocol"] == "tcp"
        assert rules[0]["FromPort"] == rules[0]["ToPort"] == system.port
        assert [r["CidrIp"] for r in rules[0]["IpRanges"]] == [f"{DRIVER}/32"]
    finally:
        b.shutdown()
    assert all(m.state is State.STOPPED for m in machines)
    states = {i["State"]["Name"] for i in cluster_instances(ec2, system, ("pending", "running",
                                                                          "terminated"))}
    assert states == {"terminated"}

    # A second cluster from the same driver address reuses the group, rule unchanged.
    again = make_system(moto, ec2, port=system.port, poweroff=False)
    b2 = bigpool.start(system=again)
    try:
        b2.start(1, services={"Echo": Echo()})
        inst = cluster_instances(ec2, again)[0]
        assert inst["SecurityGroups"][0]["GroupId"] == group_id
        group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        assert [r["CidrIp"] for r in group["IpPermissions"][0]["IpRanges"]] == [f"{DRIVER}/32"]
        assert "poweroff" not in user_data_of(ec2, inst["InstanceId"]).split("[Service]")[1]
    finally:
        b2.shutdown()


def _is_spot(params: dict[str, Any]) -> bool:
    """Whether a serialized RunInstances request (what before-call sees) asks for spot."""
    return any(k.startswith("InstanceMarketOptions") for k in params.get("body") or {})


def _capacity_error(params: dict[str, Any], **_: Any) -> Any:
    if not _is_spot(params):
        return None
    response = AWSResponse("http://127.0.0.1/", 500, {}, None)
    parsed = {"Error": {"Code": "InsufficientInstanceCapacity",
                        "Message": "There is no Spot capacity available (injected)"},
              "ResponseMetadata": {"HTTPStatusCode": 500}}
    return response, parsed


def test_spot_falls_back_to_on_demand_and_ondemand_skips_spot(moto: str, ec2: Any) -> None:
    system = make_system(moto, ec2)
    b = bigpool.start(system=system)
    calls: list[bool] = []
    system.ec2.meta.events.register(
        "before-call.ec2.RunInstances", lambda params, **kw: calls.append(_is_spot(params)))
    system.ec2.meta.events.register("before-call.ec2.RunInstances", _capacity_error)
    try:
        b.start(1, services={"Echo": Echo()})
        [inst] = cluster_instances(ec2, system)
        assert "InstanceLifecycle" not in inst  # on-demand
        assert calls == [True, False]
        assert [r.market for r in system.instances.values()] == ["on-demand"]
    finally:
        b.shutdown()

    ondemand = make_system(moto, ec2, ondemand=True)
    b = bigpool.start(system=ondemand)
    calls.clear()
    ondemand.ec2.meta.events.register(
        "before-call.ec2.RunInstances", lambda params, **kw: calls.append(_is_spot(params)))
    try:
        b.start(1, services={"Echo": Echo()})
        [inst] = cluster_instances(ec2, ondemand)
        assert "InstanceLifecycle" not in inst
        assert calls == [False]
    finally:
        b.shutdown()


def _error(code: str, status: int = 400) -> Any:
    return AWSResponse("http://127.0.0.1/", status, {}, None), {
        "Error": {"Code": code, "Message": f"{code} (injected)"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }


def test_partial_spot_kept_when_on_demand_fails_and_new_instances_not_yet_visible(
    moto: str, ec2: Any
) -> None:
    system = make_system(moto, ec2)
    b = bigpool.start(system=system)
    describes: list[int] = []

    def not_found_at_first(**_: Any) -> Any:
        describes.append(1)
        return _error("InvalidInstanceID.NotFound") if len(describes) == 1 else None

    def on_demand_fails(params: dict[str, Any], **_: Any) -> Any:
        return None if _is_spot(params) else _error("InsufficientInstanceCapacity", 500)

    system.ec2.meta.events.register("before-call.ec2.DescribeInstances", not_found_at_first)
    system.ec2.meta.events.register("before-call.ec2.RunInstances", on_demand_fails)
    try:
        # Moto gives 1 spot instance of the 2 asked; on-demand has no capacity either.
        machines = b.start(2, services={"Echo": Echo()})
        assert len(machines) == 1 and len(describes) >= 2
        [inst] = cluster_instances(ec2, system)
        assert inst.get("InstanceLifecycle") == "spot"
    finally:
        b.shutdown()


def test_a_failed_termination_is_loud_and_names_the_cleanup(moto: str, ec2: Any) -> None:
    system = make_system(moto, ec2)
    b = bigpool.start(system=system)
    b.start(1, services={"Echo": Echo()})
    system.ec2.meta.events.register(
        "before-call.ec2.TerminateInstances", lambda **_: _error("UnauthorizedOperation", 403))
    with pytest.raises(Exception, match=f"ec2 cleanup --cluster {system.cluster_id} --yes"):
        b.shutdown()
    [inst] = cluster_instances(ec2, system)  # still running: the error was not a lie
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def test_shutdown_is_loud_while_another_thread_fails_to_terminate(moto: str, ec2: Any) -> None:
    # Other threads terminate instances too: the monitor at the TTL, a hand-off thread whose
    # machine stopped, atexit. When shutdown comes while such a request is still under way,
    # shutdown must not count on it: here it fails, and the instance stays up.
    system = make_system(moto, ec2)
    b = bigpool.start(system=system)
    b.start(1, services={"Echo": Echo()})
    first_under_way, release = threading.Event(), threading.Event()
    requests: list[str] = []

    def refuse(**_: Any) -> Any:
        requests.append(threading.current_thread().name)
        if len(requests) == 1:
            first_under_way.set()
            release.wait(60)  # slow, until another request comes (shutdown's, if it makes one)
        else:
            release.set()
        return _error("UnauthorizedOperation", 403)

    system.ec2.meta.events.register("before-call.ec2.TerminateInstances", refuse)
    elsewhere_errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            system.terminate_all()
        except EC2Error as exc:
            elsewhere_errors.append(exc)

    other = threading.Thread(target=elsewhere, name="elsewhere", daemon=True)
    other.start()
    try:
        assert first_under_way.wait(60), "the other thread never asked EC2 to terminate"
        with pytest.raises(EC2Error, match=f"ec2 cleanup --cluster {system.cluster_id} --yes"):
            b.shutdown()
        release.set()
        other.join(60)
        assert not other.is_alive()
        assert len(elsewhere_errors) == 1  # the other thread's failure was loud as well
        assert len(cluster_instances(ec2, system)) == 1  # still running: no error was a lie
    finally:
        release.set()
        other.join(60)
        left = [i["InstanceId"] for i in cluster_instances(ec2, system)]
        if left:
            ec2.terminate_instances(InstanceIds=left)


def test_ami_from_public_ssm_parameter(moto: str, ec2: Any) -> None:
    # Moto keeps no /aws/service/... parameters (and refuses to store them), so the public
    # parameter is answered here, on the wire, the way SSM would.
    import json

    ami = moto_ami(ec2)
    asked: list[str] = []

    def public_parameter(params: dict[str, Any], **_: Any) -> Any:
        name = json.loads(params["body"])["Name"]
        asked.append(name)
        response = AWSResponse("http://127.0.0.1/", 200, {}, None)
        return response, {"Parameter": {"Name": name, "Type": "String", "Value": ami},
                          "ResponseMetadata": {"HTTPStatusCode": 200}}

    session = guarded_session(moto)
    session.events.register("before-call.ssm.GetParameter", public_parameter)
    system = make_system(moto, ec2, ami=None, image="ubuntu-24.04", session=session)
    b = bigpool.start(system=system)
    try:
        b.start(1, services={"Echo": Echo()})
        assert cluster_instances(ec2, system)[0]["ImageId"] == ami
        assert asked == ["/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/"
                         "ebs-gp3/ami-id"]
    finally:
        b.shutdown()


def test_budget_refuses_what_it_cannot_afford(moto: str, ec2: Any) -> None:
    price = INSTANCE_TYPES["m6i.large"].price_usd
    system = make_system(moto, ec2, max_hourly_usd=price * 2.5)
    b = bigpool.start(system=system)
    try:
        b.start(2, services={"Echo": Echo()})
        with pytest.raises(BudgetExceededError, match=r"over the budget .* no instance was started"):
            b.start(1, services={"Echo": Echo()})
        assert len(cluster_instances(ec2, system)) == 2
    finally:
        b.shutdown()


def test_ttl_stops_the_cluster(moto: str, ec2: Any) -> None:
    system = make_system(moto, ec2, ttl=3.0, monitor_interval=0.1)
    b = bigpool.start(system=system)
    try:
        [m] = b.start(1, services={"Echo": Echo()})
        wait_until(lambda: m.state is State.STOPPED, 20, "the TTL to stop the machine")
        assert isinstance(m.err(), ClusterExpiredError)
        [inst] = cluster_instances(ec2, system, ("terminated",))
        assert instance_tags(inst)["bigpool:expires"].endswith("Z")
        # Each instance also stops itself at the TTL, should the driver be gone.
        assert "RuntimeMaxSec=3s" in user_data_of(ec2, inst["InstanceId"])
        with pytest.raises(ClusterExpiredError):
            b.start(1, services={"Echo": Echo()})
    finally:
        b.shutdown()


def test_lost_instance_stops_its_machine(moto: str, ec2: Any) -> None:
    system = make_system(moto, ec2, monitor_interval=0.1)
    b = bigpool.start(system=system)
    try:
        [m] = b.start(1, services={"Echo": Echo()})
        [inst] = cluster_instances(ec2, system)
        ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])  # as a spot reclaim would
        wait_until(lambda: m.state is State.STOPPED, 20, "the monitor to notice")
        assert inst["InstanceId"] in str(m.err()) and "terminated" in str(m.err())
    finally:
        b.shutdown()


# the CLI ----------------------------------------------------------------------------------------


def test_cli_lists_and_cleans_up_leftovers(moto: str, ec2: Any) -> None:
    from bigpool.__main__ import main as bigpool_main

    ami = moto_ami(ec2)
    tags = [{"Key": TAG_CLUSTER, "Value": "deadbeef"}, {"Key": TAG_DRIVER_HOST, "Value": "gone"}]
    left = ec2.run_instances(ImageId=ami, MinCount=2, MaxCount=2, InstanceType="t3.medium",
                             TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
    left_ids = sorted(i["InstanceId"] for i in left["Instances"])
    other = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    def run(*argv: str) -> tuple[int, str]:
        import contextlib

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = bigpool_main(["ec2", "--endpoint-url", moto, *argv])
        return status, out.getvalue()

    status, text = run("list", "--cluster", "deadbeef")
    assert status == 0 and all(i in text for i in left_ids) and other not in text
    status, text = run("cleanup", "--cluster", "deadbeef")
    assert status == 1 and "--yes" in text
    assert {i["InstanceId"] for i in list_instances(ec2, cluster="deadbeef")} == set(left_ids)
    status, text = run("cleanup", "--cluster", "deadbeef", "--yes")
    assert status == 0 and "terminated 2" in text
    assert list_instances(ec2, cluster="deadbeef") == []
    state = ec2.describe_instances(InstanceIds=[other])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] in ("pending", "running")
    ec2.terminate_instances(InstanceIds=[other])

    # The real entry point, as a user types it.
    proc = subprocess.run([sys.executable, "-m", "bigpool", "ec2", "--endpoint-url", moto, "list",
                           "--cluster", "deadbeef"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no bigpool instances" in proc.stdout, proc.stderr


def test_nothing_left_behind(moto: str) -> None:
    ec2 = boto3.client("ec2", endpoint_url=moto, region_name=REGION)
    assert list_instances(ec2, states=("pending", "running")) == []
