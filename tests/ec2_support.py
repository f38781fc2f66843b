"""Moto in server mode for the EC2 tests: real HTTP on loopback, and nothing else.

:func:`moto_env` starts one ``ThreadedMotoServer`` on 127.0.0.1, points boto3 at it through
the environment (``AWS_ENDPOINT_URL``, dummy credentials, no config files, no instance
metadata), and :func:`guarded_session` makes a boto3 session that refuses to send any request
anywhere but that server.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3

REGION = "us-east-1"


@contextmanager
def moto_env() -> Iterator[str]:
    """Run moto's server on loopback with boto3 pointed at it; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = dict(os.environ)
    os.environ.update({
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield url
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def guarded_session(url: str) -> Any:
    """A boto3 session whose every request must go to ``url`` (else the test fails)."""
    session = boto3.session.Session(region_name=REGION)
    sent: list[str] = []

    def guard(request: Any, **_: Any) -> None:
        if not request.url.startswith(url):
            raise AssertionError(f"a request left for {request.url}, not moto at {url}")
        sent.append(request.url)

    session.events.register("before-send", guard)
    session.sent = sent  # type: ignore[attr-defined]
    return session


_amis: dict[str, str] = {}


def moto_ami(ec2: Any) -> str:
    """An image moto knows (looked up once per server: the listing takes seconds)."""
    url = ec2.meta.endpoint_url
    if url not in _amis:
        _amis[url] = str(ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])
    return _amis[url]


def user_data_of(ec2: Any, instance_id: str) -> str:
    """The user-data EC2 holds for ``instance_id``, decoded."""
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode("utf-8")


def user_data_files(script: str) -> dict[str, bytes]:
    """The files the user-data script unpacks: name -> contents."""
    out = {}
    for name, payload in re.findall(r"^unpack (\S+) <<'B64'\n(.*?)\nB64$", script, re.M | re.S):
        out[name] = gzip.decompress(base64.b64decode(payload))
    return out
