"""``python -m bigpool ec2 list|cleanup``: see and end bigpool's EC2 instances, by tag.

Every instance the EC2 system launches carries ``bigpool:cluster`` and friends, so instances
left by a driver that died (or by a bug) can be found and terminated from any host with the
account's credentials::

    python -m bigpool ec2 list [--cluster ID] [--region R]
    python -m bigpool ec2 cleanup [--cluster ID] [--older-than SECONDS] [--yes]

``cleanup`` without ``--yes`` only lists what it would terminate (and exits with status 1 if
there is anything). Both use boto3's standard credentials and region configuration;
``--endpoint-url`` (or ``$AWS_ENDPOINT_URL``) points them elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any, TextIO

from .ec2 import (
    TAG_CLUSTER,
    TAG_DRIVER_HOST,
    TAG_STARTED,
    TAG_VERSION,
    instance_tags,
    list_instances,
    terminate_instances,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bigpool ec2",
                                     description="bigpool's EC2 instances")
    parser.add_argument("--region", default=None, help="AWS region (default: boto3's)")
    parser.add_argument("--endpoint-url", default=None, help="EC2 endpoint (default: AWS's)")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list bigpool instances that are not terminated")
    listing.add_argument("--cluster", default=None, help="only this cluster")
    cleanup = sub.add_parser("cleanup", help="terminate leftover bigpool instances")
    cleanup.add_argument("--cluster", default=None, help="only this cluster")
    cleanup.add_argument("--older-than", type=float, default=0.0, metavar="SECONDS",
                         help="only instances launched at least this long ago")
    cleanup.add_argument("--yes", action="store_true", help="really terminate them")
    return parser


def _age(instance: dict[str, Any], now: datetime.datetime) -> float:
    launched = instance.get("LaunchTime")
    if not isinstance(launched, datetime.datetime):
        return 0.0
    if launched.tzinfo is None:
        launched = launched.replace(tzinfo=datetime.timezone.utc)
    return (now - launched).total_seconds()


def _print_table(instances: list[dict[str, Any]], now: datetime.datetime, out: TextIO) -> None:
    header = ("INSTANCE", "TYPE", "STATE", "MARKET", "CLUSTER", "DRIVER", "STARTED", "AGE", "VERSION")
    rows = [header]
    for i in instances:
        tags = instance_tags(i)
        rows.append((
            i["InstanceId"], i.get("InstanceType", "?"), i.get("State", {}).get("Name", "?"),
            i.get("InstanceLifecycle", "on-demand"), tags.get(TAG_CLUSTER, "?"),
            tags.get(TAG_DRIVER_HOST, "?"), tags.get(TAG_STARTED, "?"),
            f"{_age(i, now) / 60:.0f}m", tags.get(TAG_VERSION, "?"),
        ))
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(header))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip(), file=out)


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command; its exit status."""
    import boto3

    out = out or sys.stdout
    args = _parser().parse_args(argv)
    session = boto3.session.Session(region_name=args.region)
    ec2 = session.client("ec2", endpoint_url=args.endpoint_url)
    now = datetime.datetime.now(datetime.timezone.utc)
    instances = list_instances(ec2, cluster=args.cluster)
    if args.command == "list":
        if not instances:
            print(f"no bigpool instances in {ec2.meta.region_name}", file=out)
        else:
            _print_table(instances, now, out)
        return 0
    chosen = [i for i in instances if _age(i, now) >= args.older_than]
    if not chosen:
        print(f"no bigpool instances to clean up in {ec2.meta.region_name}", file=out)
        return 0
    _print_table(chosen, now, out)
    if not args.yes:
        print(f"{len(chosen)} instance(s) would be terminated; run again with --yes", file=out)
        return 1
    terminate_instances(ec2, [i["InstanceId"] for i in chosen])
    print(f"terminated {len(chosen)} instance(s)", file=out)
    return 0
