"""The driver's debug endpoint: a small HTTP/1.1 server on its own threads.

Routes (all GET):

* ``/debug/bigmachine/status``: the status page (``?format=json``, ``?refresh=N``);
* ``/debug/bigmachine/pprof/``: the index of profiles;
* ``/debug/bigmachine/pprof/profile?seconds=N``: merged CPU profile, gzip'd pprof protobuf;
* ``/debug/bigmachine/pprof/flamegraph?seconds=N``: the same as an SVG flame graph
  (``?format=collapsed`` for folded stacks, ``?by=machine`` to split it by machine);
* ``/debug/bigmachine/pprof/threads``: ``py-spy dump`` of every process;
* ``/debug/bigmachine/pprof/heap``: tracemalloc's top sites where tracing is on;
* ``/debug/vars``: the driver's expvars with each machine's under ``machines``.

Profiles take ``?machine=ADDR`` (or ``driver``) for one process group. Bad parameters get a
400, an unknown machine or path a 404, each with a one-line text message. The work runs on
B's event loop (:mod:`bigpool.debug.cluster`); a request thread only waits for it, so a
10-second profile does not hold up the status page. The server binds loopback unless told
otherwise, and has no authentication: do not expose it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.server
import json
import logging
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from . import cluster, flamegraph, status

if TYPE_CHECKING:
    from ..machine import B

__all__ = ["DebugServer", "parse_listen_address"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_SECONDS = 30
# Added to a profile's duration for the whole request (machines answer within seconds + 60).
REQUEST_SLACK = 90.0
# Bound on requests that gather quick information (status, expvars, dumps).
QUICK_TIMEOUT = 60.0

_log = logging.getLogger("bigpool.debug")


def parse_listen_address(address: str) -> tuple[str, int]:
    """``"host:port"``, ``":port"`` (loopback) or ``"port"`` -> ``(host, port)``.

    Raises ``ValueError`` naming the address when the port is not a number in 0..65535
    (0 picks a free port).
    """
    if not isinstance(address, str):
        raise TypeError(f"debug address must be a string like '127.0.0.1:3333', not {address!r}")
    text = address.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(
            f"debug address {address!r} needs a port number from 0 to 65535 ('127.0.0.1:3333')"
        )
    return host, port


class _HTTPError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    b: B


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "bigpool-debug"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        try:
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True, strict_parsing=False)
            params = {k: v[-1] for k, v in query.items()}
            route = _ROUTES.get(url.path)
            if route is None:
                if url.path in ("/", "/debug/bigmachine", "/debug/bigmachine/"):
                    self._redirect("/debug/bigmachine/status")
                    return
                if url.path.startswith("/debug/bigmachine/pprof/"):
                    name = url.path.rsplit("/", 1)[-1]
                    raise _HTTPError(404, f"unknown profile {name!r}; available: "
                                          "profile, flamegraph, threads, heap")
                raise _HTTPError(404, f"no page {url.path!r}; try /debug/bigmachine/status")
            route(self, params)
        except _HTTPError as exc:
            self._send(exc.code, "text/plain; charset=utf-8", exc.message.encode() + b"\n")
        except cluster.UnknownMachineError as exc:
            self._send(404, "text/plain; charset=utf-8", str(exc).encode() + b"\n")
        except cluster.ProfileFailedError as exc:
            self._send(502, "text/plain; charset=utf-8", str(exc).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            _log.warning("debug request %s failed", self.path, exc_info=True)
            message = f"{type(exc).__name__}: {exc}\n"
            with contextlib.suppress(OSError):
                self._send(500, "text/plain; charset=utf-8", message.encode())

    # helpers --------------------------------------------------------------------------------

    def _send(self, code: int, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _run(self, coro: Any, timeout: float) -> Any:
        b = self.server.b
        try:
            return b._run(coro, timeout=timeout)
        except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError):
            raise _HTTPError(504, f"the cluster did not answer within {timeout:g}s") from None
        except RuntimeError as exc:
            if b._shutdown:
                raise _HTTPError(503, "the cluster is shutting down") from exc
            raise

    # routes -------------------------------------------------------------------------------

    def status(self, params: dict[str, str]) -> None:
        fmt = _choice(params, "format", ("html", "json", "text"), "html")
        refresh = _int_param(params, "refresh", None, 1, 3600)
        result = self._run(cluster.status(self.server.b), QUICK_TIMEOUT)
        if fmt == "json":
            self._json(result)
        elif fmt == "text":
            self._send(200, "text/plain; charset=utf-8", status.render_text(result).encode())
        else:
            html = status.render_html(result, refresh=refresh)
            self._send(200, "text/html; charset=utf-8", html.encode())

    def expvars(self, params: dict[str, str]) -> None:
        self._json(self._run(cluster.expvars(self.server.b), QUICK_TIMEOUT))

    def _json(self, value: Any) -> None:
        body = json.dumps(value, indent=2, default=str).encode() + b"\n"
        self._send(200, "application/json", body)

    def index(self, params: dict[str, str]) -> None:
        b = self.server.b
        heap_who = self._run(cluster.heap_available(b), QUICK_TIMEOUT)
        machines = sorted(b.machines(), key=lambda m: m.addr)
        self._send(200, "text/html; charset=utf-8", _index_html(
            [m.addr for m in machines], heap_who).encode())

    def _profile(self, params: dict[str, str]) -> Any:
        seconds = _int_param(params, "seconds", DEFAULT_SECONDS, 1, cluster.MAX_SECONDS)
        assert seconds is not None
        machine = params.get("machine") or None
        cluster.select(self.server.b, machine)  # a 404 now, not after the profile
        return self._run(cluster.cpu_profile(self.server.b, seconds, machine),
                         seconds + REQUEST_SLACK)

    def profile(self, params: dict[str, str]) -> None:
        fmt = _choice(params, "format", ("pprof", "collapsed"), "pprof")
        by = _choice(params, "by", ("", "machine", "role", "pid"), "")
        prof = self._profile(params)
        headers = _notes_header(prof.notes)
        if fmt == "collapsed":
            text = prof.collapsed(group_by=by or None)
            self._send(200, "text/plain; charset=utf-8", text.encode(), headers)
            return
        headers["Content-Disposition"] = 'attachment; filename="profile.pb.gz"'
        self._send(200, "application/octet-stream", prof.gzipped(), headers)

    def flamegraph(self, params: dict[str, str]) -> None:
        fmt = _choice(params, "format", ("svg", "collapsed"), "svg")
        by = _choice(params, "by", ("", "machine", "role", "pid"), "")
        prof = self._profile(params)
        headers = _notes_header(prof.notes)
        if fmt == "collapsed":
            text = prof.collapsed(group_by=by or None)
            self._send(200, "text/plain; charset=utf-8", text.encode(), headers)
            return
        machines = prof.label_values("machine")
        who = " + ".join(
            part for part in ("driver" if cluster.DRIVER in machines else "",
                              _count(len(machines - {cluster.DRIVER}), "machine")) if part
        )
        title = f"CPU, {prof.duration_ns // 1_000_000_000} s: {who or 'no samples'}"
        svg = flamegraph.render(prof.stacks(lines=False, group_by=by or None), title=title,
                                notes=prof.notes)
        self._send(200, "image/svg+xml", svg.encode(), headers)

    def threads(self, params: dict[str, str]) -> None:
        machine = params.get("machine") or None
        text = self._run(cluster.threads(self.server.b, machine), QUICK_TIMEOUT)
        self._send(200, "text/plain; charset=utf-8", text.encode())

    def heap(self, params: dict[str, str]) -> None:
        machine = params.get("machine") or None
        text = self._run(cluster.heap(self.server.b, machine), QUICK_TIMEOUT)
        if text is None:
            raise _HTTPError(404, "no process traces memory allocations: start the driver and "
                                  "machines with PYTHONTRACEMALLOC=1 (or call tracemalloc.start())")
        self._send(200, "text/plain; charset=utf-8", text.encode())


_ROUTES = {
    "/debug/bigmachine/status": _Handler.status,
    "/debug/bigmachine/pprof/": _Handler.index,
    "/debug/bigmachine/pprof": _Handler.index,
    "/debug/bigmachine/pprof/profile": _Handler.profile,
    "/debug/bigmachine/pprof/flamegraph": _Handler.flamegraph,
    "/debug/bigmachine/pprof/threads": _Handler.threads,
    "/debug/bigmachine/pprof/goroutine": _Handler.threads,
    "/debug/bigmachine/pprof/heap": _Handler.heap,
    "/debug/vars": _Handler.expvars,
}


def _int_param(params: dict[str, str], name: str, default: int | None, low: int,
               high: int) -> int | None:
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _HTTPError(400, f"{name} must be a whole number from {low} to {high}, not {text!r}")
    return value


def _choice(params: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = params.get(name, default)
    if value not in allowed:
        shown = ", ".join(a for a in allowed if a)
        raise _HTTPError(400, f"{name} must be one of {shown}, not {value!r}")
    return value


def _count(n: int, noun: str) -> str:
    return "" if n == 0 else f"{n} {noun}" + ("" if n == 1 else "s")


def _notes_header(notes: list[str]) -> dict[str, str]:
    if not notes:
        return {}
    text = " | ".join(" ".join(n.split()) for n in notes)
    return {"X-Bigpool-Profile-Notes": text.encode("ascii", "backslashreplace").decode()[:4000]}


def _index_html(machines: list[str], heap_who: list[str]) -> str:
    from html import escape

    def row(href: str, name: str, what: str) -> str:
        return f"<tr><td><a href='{escape(href)}'>{escape(name)}</a></td><td>{escape(what)}</td></tr>"

    rows = [
        row("profile?seconds=30", "profile",
            "CPU profile of the whole cluster, 30 s, pprof (go tool pprof reads it)"),
        row("flamegraph?seconds=10", "flamegraph", "CPU flame graph of the whole cluster, 10 s"),
        row("flamegraph?seconds=10&by=machine", "flamegraph by machine",
            "the same, split by machine"),
        row("flamegraph?seconds=10&format=collapsed", "collapsed", "folded stacks, 10 s"),
        row("threads", "threads", "stack dump of every thread of every process (py-spy dump)"),
    ]
    if heap_who:
        rows.append(row("heap", "heap", "tracemalloc top sites on " + ", ".join(heap_who)))
    else:
        rows.append("<tr><td>heap</td><td>off: no process runs tracemalloc "
                    "(PYTHONTRACEMALLOC=1)</td></tr>")
    per_machine = []
    for addr in ["driver", *machines]:
        q = urllib.parse.quote(addr, safe="")
        per_machine.append(
            f"<tr><td>{escape(addr)}</td><td><a href='profile?seconds=30&machine={q}'>profile</a> "
            f"<a href='flamegraph?seconds=10&machine={q}'>flamegraph</a> "
            f"<a href='threads?machine={q}'>threads</a></td></tr>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>/debug/bigmachine/pprof</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em}td{padding:2px 10px}</style>"
        "</head><body><h1>/debug/bigmachine/pprof</h1>"
        "<p>Profiles of the whole cluster (driver, machines and their worker processes), merged. "
        "<a href='/debug/bigmachine/status'>status</a></p><table>"
        + "".join(rows)
        + "</table><h2>one machine</h2><table>"
        + "".join(per_machine)
        + "</table></body></html>\n"
    )


class DebugServer:
    """Serves B's debug pages on ``address`` (``"host:port"``; loopback if the host is left
    out; port 0 picks one: see :attr:`url`) until :meth:`close`.

    Raises ``OSError`` if the address cannot be bound (in use, say), ``ValueError`` for a
    malformed address.
    """

    def __init__(self, b: B, address: str) -> None:
        host, port = parse_listen_address(address)
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"debug endpoint cannot listen on {host}:{port}: "
                                     f"{exc.strerror}") from exc
        self._server.b = b
        bound = self._server.server_address
        self.host, self.port = str(bound[0]), int(bound[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="bigpool-debug", daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """Where the server listens, as ``http://host:port`` (pages are under it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port; requests under way end with the cluster."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
