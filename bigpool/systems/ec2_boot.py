"""Driver side of an EC2 machine's boot: the user-data, and the hand-off to its first stage.

The user-data is a bash script (gzip+base64 payloads inside, well under EC2's 16 KB) that:

* writes, under ``/var/lib/bigpool`` (mode 0700), the first stage program
  (:mod:`.ec2_stage1`), its ``boot.json`` (port, timeouts, the node's environment), the *boot*
  leaf certificate and key, and the CA certificate: never the CA's key;
* writes ``boot.sh``, which installs Python (``apt-get install python3 python3-venv``), makes
  the base venv with bigpool's own dependencies pinned to the driver's versions, and execs the
  first stage;
* runs ``boot.sh`` as the systemd unit ``bigpool.service`` whose ``ExecStopPost`` powers the
  instance off (so a machine that exits for any reason, its watchdog included, ends its
  instance; launched with shutdown behaviour ``terminate``, the instance is then gone), with
  ``RuntimeMaxSec`` set to the cluster's TTL when there is one.

**Test mode.** With ``BIGPOOL_EC2_TEST_ROOT`` set in its environment the same script keeps every
file under that directory, uses ``$BIGPOOL_EC2_TEST_PYTHON`` instead of installing anything,
runs ``boot.sh`` in the foreground instead of through systemd, and stands in for the power-off by
appending the boot script's exit status to ``$BIGPOOL_EC2_TEST_ROOT/poweroff``. Nothing else
changes, so tests run the very bytes an instance gets.

:func:`hand_off` is the driver's half of the first stage's protocol.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import shlex
import socket
import ssl
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..h2rpc import BigpoolError, Credentials
from . import ec2_stage1

__all__ = [
    "BOOT_NAME",
    "MAX_USER_DATA",
    "BootHandoffError",
    "bootstrap_package",
    "hand_off",
    "user_data",
]

BOOT_NAME = ec2_stage1.BOOT_NAME
# EC2 refuses user-data over 16 KB (before base64).
MAX_USER_DATA = 16 * 1024
STATE_DIR = "/var/lib/bigpool"
# bigpool's own dependencies on a machine, installed in the base venv at the driver's versions.
MACHINE_REQUIREMENTS = ("h2", "hpack", "hyperframe", "dill", "psutil", "uvloop")


class BootHandoffError(BigpoolError):
    """The driver could not hand a machine its credentials and bigpool (the first stage)."""

    temporary = True

    def __init__(self, addr: str, reason: str) -> None:
        self.addr = addr
        super().__init__(f"boot hand-off to {addr} failed: {reason}")


def _pack(data: bytes) -> str:
    encoded = base64.b64encode(gzip.compress(data, 9, mtime=0)).decode("ascii")
    return "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def machine_requirements() -> list[str]:
    """``name==version`` for bigpool's machine-side dependencies, as installed on the driver."""
    out = []
    for name in MACHINE_REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def user_data(
    *,
    boot_credentials: Credentials,
    port: int,
    boot_timeout: float,
    node_env: Mapping[str, str],
    requirements: Sequence[str],
    ttl: float | None = None,
    poweroff: bool = True,
    comment: str = "",
) -> str:
    """The user-data script for one cluster (the same for each of its machines).

    ``poweroff=False`` leaves out the power-off after bigpool exits (for debugging a boot).
    Raises ``ValueError`` if it would exceed EC2's 16 KB, or if ``boot_credentials`` carries
    anything that looks like a CA key.
    """
    if b"PRIVATE KEY" in boot_credentials.ca_pem:
        raise ValueError("refusing to put a CA private key in user-data")
    with open(ec2_stage1.__file__, "rb") as f:
        stage1 = f.read()
    config = {
        "port": port,
        "boot_timeout": boot_timeout,
        "env": dict(node_env),
    }
    files = {
        "stage1.py": stage1,
        "boot.json": json.dumps(config, sort_keys=True).encode("utf-8"),
        "boot-cert.pem": boot_credentials.cert_pem,
        "boot-key.pem": boot_credentials.key_pem,
        "ca.pem": boot_credentials.ca_pem,
    }
    unpack = "\n".join(
        f"unpack {name} <<'B64'\n{_pack(data)}\nB64" for name, data in files.items()
    )
    pins = " ".join(shlex.quote(r) for r in requirements)
    runtime_max = f"{max(1, int(ttl))}s" if ttl else "infinity"
    stop_post = "ExecStopPost=/bin/systemctl poweroff" if poweroff else ""
    script = f"""#!/bin/bash
# bigpool machine boot{': ' + comment if comment else ''}. See docs/ec2.md.
set -eu
root="${{BIGPOOL_EC2_TEST_ROOT:-}}"
state="$root{STATE_DIR}"
umask 077
mkdir -p "$state"
chmod 700 "$state"
unpack() {{ base64 -d | gzip -dc > "$state/$1"; }}
{unpack}
cat > "$state/boot.sh" <<'SH'
#!/bin/bash
set -eu
state="$1"
if [ -n "${{BIGPOOL_EC2_TEST_ROOT:-}}" ]; then
  py="$BIGPOOL_EC2_TEST_PYTHON"
else
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e "$state/base/.ready" ]; then
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q python3 python3-venv
    python3 -m venv "$state/base"
    "$state/base/bin/pip" install -q --disable-pip-version-check --upgrade pip
    "$state/base/bin/pip" install -q --disable-pip-version-check {pins}
    touch "$state/base/.ready"
  fi
  py="$state/base/bin/python"
fi
export BIGPOOL_VENV_BASE="$("$py" -c 'import os, site; print(os.pathsep.join(site.getsitepackages()))')"
export BIGPOOL_BUNDLE_DIR="$state/bundles" BIGPOOL_VENV_DIR="$state/venvs" XDG_CACHE_HOME="$state/cache"
exec "$py" "$state/stage1.py" "$state"
SH
chmod 700 "$state/boot.sh"
if [ -n "$root" ]; then
  status=0
  "$state/boot.sh" "$state" || status=$?
  echo "$status" >> "$root/poweroff"
  exit 0
fi
umask 022
cat > /etc/systemd/system/bigpool.service <<UNIT
[Unit]
Description=bigpool machine
Wants=network-online.target
After=network-online.target
[Service]
ExecStart=$state/boot.sh $state
{stop_post}
RuntimeMaxSec={runtime_max}
LimitNOFILE=1048576
UNIT
systemctl daemon-reload
systemctl start --no-block bigpool.service
"""
    size = len(script.encode("utf-8"))
    if size > MAX_USER_DATA:
        raise ValueError(f"user-data of {size} bytes exceeds EC2's limit of {MAX_USER_DATA}")
    return script


_bootstrap: tuple[bytes, str] | None = None
_bootstrap_lock = threading.Lock()


def bootstrap_package() -> tuple[bytes, str]:
    """A deterministic zip of the ``bigpool`` package this driver runs, and its SHA-256 (hex).

    Whatever this process imported as bigpool (a development checkout or an installed copy) is
    what machines run: they import it from this zip. Built once per process.
    """
    global _bootstrap
    with _bootstrap_lock:
        if _bootstrap is None:
            import bigpool

            top = os.path.dirname(os.path.abspath(bigpool.__file__))
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                for dirpath, dirnames, filenames in os.walk(top):
                    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                    for name in sorted(filenames):
                        if not (name.endswith(".py") or name == "py.typed"):
                            continue
                        full = os.path.join(dirpath, name)
                        arcname = "bigpool/" + os.path.relpath(full, top).replace(os.sep, "/")
                        info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
                        info.external_attr = 0o100644 << 16
                        info.compress_type = zipfile.ZIP_DEFLATED
                        with open(full, "rb") as f:
                            zf.writestr(info, f.read())
            data = buf.getvalue()
            _bootstrap = (data, hashlib.sha256(data).hexdigest())
        return _bootstrap


def _client_context(credentials: Credentials) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=credentials.ca_pem.decode("ascii"))
    credentials._load_into(ctx)
    ctx.set_alpn_protocols([ec2_stage1.ALPN])
    return ctx


def hand_off(
    host: str,
    port: int,
    *,
    driver_credentials: Credentials,
    machine_credentials: Credentials,
    timeout: float,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Give the first stage at ``host:port`` its final credentials and (if it lacks it) the
    bootstrap zip; blocks until it accepts, retrying while the instance boots.

    Returns the first stage's hello (``{"need_zip": bool, "python": "3.x"}``). Raises
    :class:`BootHandoffError` after ``timeout`` seconds, or at once if the peer's certificate is
    not the cluster's, or once ``cancelled()`` says so (checked between attempts).
    """
    data, sha = bootstrap_package()
    addr = f"{host}:{port}"
    ctx = _client_context(driver_credentials)
    deadline = time.monotonic() + timeout
    delay = 0.05
    last = "no attempt"
    while True:
        if cancelled is not None and cancelled():
            raise BootHandoffError(addr, "the machine was stopped")
        try:
            with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(
                raw, server_hostname=BOOT_NAME
            ) as tls:
                if tls.selected_alpn_protocol() != ec2_stage1.ALPN:
                    raise BootHandoffError(addr, "the peer does not speak the boot protocol")
                ec2_stage1.send_message(tls, {
                    "bootstrap_sha256": sha,
                    "credentials": {
                        "cert": machine_credentials.cert_pem.decode("ascii"),
                        "key": machine_credentials.key_pem.decode("ascii"),
                        "ca": machine_credentials.ca_pem.decode("ascii"),
                    },
                })
                hello: dict[str, Any] = ec2_stage1.read_message(tls)
                if hello.get("need_zip"):
                    ec2_stage1.send_message(tls, {"size": len(data)})
                    tls.sendall(data)
                reply = ec2_stage1.read_message(tls)
                if not reply.get("ok"):
                    raise BootHandoffError(addr, f"the machine refused: {reply!r}")
                return hello
        except ssl.SSLCertVerificationError as exc:
            raise BootHandoffError(addr, f"the machine's certificate is not ours: {exc}") from exc
        except (OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() + delay > deadline:
            raise BootHandoffError(addr, f"no answer within {timeout:g}s ({last})")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
