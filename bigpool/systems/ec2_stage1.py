"""The first stage of an EC2 machine: standard library only, shipped inside the user-data.

An instance boots with nothing of bigpool on it, and the user-data (at most 16 KB) cannot carry
bigpool itself. So the user-data carries this small program, which:

1. listens on the machine's RPC port with TLS, demanding a client certificate signed by the
   cluster's CA and presenting the *boot* leaf the user-data wrote (named ``bigpool-boot.invalid``,
   since the instance's address is not known when the user-data is made);
2. accepts one hand-off from the driver (ALPN ``bigpool-boot/1``): the machine's final leaf
   certificate and key (naming the address the driver dials) and, unless a copy with the same
   SHA-256 is already here, a zip of the driver's own ``bigpool`` package;
3. execs ``python -m bigpool.node`` with that zip on ``PYTHONPATH``, handing over the listening
   socket (``BIGPOOL_LISTEN_FD``) and the credentials through a pipe (``BIGPOOL_CREDENTIALS_FD``).

From then on the driver speaks bigpool's RPC to the Supervisor as with any machine. If no driver
hands off within ``boot_timeout`` seconds the program exits, and the boot script powers the
instance off. Run as ``python ec2_stage1.py STATE_DIR`` with ``STATE_DIR/boot.json`` present.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
from typing import Any

MAGIC = b"BPBOOT01"
ALPN = "bigpool-boot/1"
BOOT_NAME = "bigpool-boot.invalid"
# Largest hand-off message and bootstrap zip accepted (bigpool's own package is well under 1 MB).
MAX_HEADER = 1 << 20
MAX_ZIP = 64 << 20
_LENGTH = struct.Struct(">I")


def _log(message: str) -> None:
    print(f"bigpool stage1: {message}", file=sys.stderr, flush=True)


def read_exact(sock: Any, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ``ConnectionError`` if it closes first."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection mid-message")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def send_message(sock: Any, obj: Any) -> None:
    """One framed JSON message: magic, 4-byte big-endian length, JSON."""
    data = json.dumps(obj).encode("utf-8")
    sock.sendall(MAGIC + _LENGTH.pack(len(data)) + data)


def read_message(sock: Any) -> Any:
    """The JSON message :func:`send_message` framed; ``ValueError`` if it is not one."""
    if read_exact(sock, len(MAGIC)) != MAGIC:
        raise ValueError("not a bigpool boot message")
    (length,) = _LENGTH.unpack(read_exact(sock, _LENGTH.size))
    if length > MAX_HEADER:
        raise ValueError(f"boot message of {length} bytes is too large")
    return json.loads(read_exact(sock, length).decode("utf-8"))


def _server_context(state: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(os.path.join(state, "boot-cert.pem"), os.path.join(state, "boot-key.pem"))
    ctx.load_verify_locations(os.path.join(state, "ca.pem"))
    ctx.set_alpn_protocols([ALPN])
    return ctx


def _write_private(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _check_credentials(creds: Any) -> bytes:
    if not isinstance(creds, dict) or not all(
        isinstance(creds.get(k), str) and "-----BEGIN" in creds[k] for k in ("cert", "key", "ca")
    ):
        raise ValueError("hand-off carries no valid credentials")
    if "PRIVATE KEY" in creds["ca"]:
        raise ValueError("hand-off carries a CA private key; refusing it")
    return json.dumps({k: creds[k] for k in ("cert", "key", "ca")}).encode("ascii")


def serve_one(tls: Any, state: str) -> tuple[bytes, str] | None:
    """Run one hand-off on an established TLS connection.

    Returns ``(credentials JSON, bootstrap zip path)``, or ``None`` if the peer is not a boot
    client (an RPC client trying too early, say).
    """
    if tls.selected_alpn_protocol() != ALPN:
        return None
    request = read_message(tls)
    sha = request.get("bootstrap_sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"bad bootstrap digest {sha!r}")
    credentials = _check_credentials(request.get("credentials"))
    directory = os.path.join(state, "bootstrap")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{sha}.zip")
    have = os.path.exists(path)
    send_message(tls, {"need_zip": not have, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"})
    if not have:
        size = read_message(tls).get("size")
        if not isinstance(size, int) or not 0 < size <= MAX_ZIP:
            raise ValueError(f"bad bootstrap size {size!r}")
        data = read_exact(tls, size)
        if hashlib.sha256(data).hexdigest() != sha:
            raise ValueError("bootstrap zip does not match its digest")
        _write_private(path, data)
    send_message(tls, {"ok": True})
    return credentials, path


def exec_node(listener: socket.socket, credentials: bytes, zip_path: str, config: Any) -> None:
    """Replace this process with ``python -m bigpool.node`` serving on ``listener``."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, credentials)
    os.close(write_fd)
    os.set_inheritable(read_fd, True)
    os.set_inheritable(listener.fileno(), True)
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in config.get("env", {}).items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (zip_path, env.get("PYTHONPATH")) if p)
    env["BIGPOOL_LISTEN_FD"] = str(listener.fileno())
    env["BIGPOOL_CREDENTIALS_FD"] = str(read_fd)
    env["PYTHONUNBUFFERED"] = "1"
    _log(f"handing over to bigpool ({zip_path})")
    os.execve(sys.executable, [sys.executable, "-m", "bigpool.node"], env)


def main(argv: list[str]) -> int:
    state = argv[1]
    with open(os.path.join(state, "boot.json"), encoding="utf-8") as f:
        config = json.load(f)
    ctx = _server_context(state)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((config.get("host", "0.0.0.0"), int(config["port"])))
    listener.listen(128)
    deadline = time.monotonic() + float(config["boot_timeout"])
    _log(f"waiting for the driver on port {config['port']}")
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _log("no driver handed off in time; exiting")
            return 2
        listener.settimeout(min(remaining, 5.0))
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            continue
        result = None
        try:
            conn.settimeout(60)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                result = serve_one(tls, state)
        except ssl.SSLError:
            pass  # an RPC client trying before the hand-off, or a stranger: not worth a line
        except (OSError, ValueError) as exc:
            _log(f"hand-off from {peer[0]} failed: {type(exc).__name__}: {exc}")
        finally:
            conn.close()
        if result is not None:
            listener.settimeout(None)
            exec_node(listener, result[0], result[1], config)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
