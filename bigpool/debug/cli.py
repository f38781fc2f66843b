"""``python -m bigpool status|profile|threads URL``: the debug endpoint from a terminal.

``URL`` is where a driver serves its debug endpoint (``bigpool.start(debug=...)``):
``http://127.0.0.1:3333``, or just ``127.0.0.1:3333`` or ``:3333``.

* ``status URL [--json]``: the machines and the pool, as a table (or the JSON);
* ``profile URL [--seconds N] [--machine ADDR] [-o FILE] [--format F]``: a merged CPU
  profile; the format follows ``FILE``'s extension (``.svg`` flame graph, ``.pb.gz`` pprof,
  ``.txt``/``.folded`` folded stacks) unless ``--format`` says; without ``-o``, folded
  stacks go to standard output;
* ``threads URL [--machine ADDR]``: every thread's stack, of every process.

Each command is a function taking the arguments after its name (``python -m bigpool``
dispatches to it). Exit status 0 on success, 1 when the endpoint refuses or cannot be reached (its message on
standard error), 2 for bad arguments. Profile notes (machines lost or left out) go to standard
error.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .status import render_text

__all__ = ["profile", "status", "threads"]

# Beyond the profile's own duration: what the endpoint may take to gather and merge.
EXTRA_SECONDS = 120.0
_FORMATS = {"pprof": ("profile", {}), "svg": ("flamegraph", {}),
            "collapsed": ("profile", {"format": "collapsed"})}


class _Failure(Exception):
    pass


def _base_url(text: str) -> str:
    if "://" not in text:
        text = "http://" + (f"127.0.0.1{text}" if text.startswith(":") else text)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Failure(f"{text!r} is not the URL of a debug endpoint (http://HOST:PORT)")
    return f"{parts.scheme}://{parts.netloc}"


def _get(url: str, timeout: float) -> tuple[bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read(), dict(response.headers.items())
    except urllib.error.HTTPError as exc:
        message = exc.read().decode("utf-8", "replace").strip()
        raise _Failure(f"{url}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Failure(f"cannot reach {url}: {reason}") from None


def _format_for(output: str | None, given: str | None) -> str:
    if given:
        return given
    if output is None:
        return "collapsed"
    if output.endswith(".svg"):
        return "svg"
    if output.endswith((".pb.gz", ".pb", ".pprof", ".gz")):
        return "pprof"
    if output.endswith((".txt", ".folded", ".collapsed")):
        return "collapsed"
    raise _Failure(f"cannot tell the format from {output!r}: name it .svg, .pb.gz or .txt, "
                   "or pass --format")


def _status(args: argparse.Namespace) -> None:
    base = _base_url(args.url)
    body, _ = _get(f"{base}/debug/bigmachine/status?format=json", timeout=90)
    status: dict[str, Any] = json.loads(body)
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(render_text(status))


def _profile(args: argparse.Namespace) -> None:
    base = _base_url(args.url)
    fmt = _format_for(args.output, args.format)
    page, extra = _FORMATS[fmt]
    query: dict[str, Any] = {"seconds": args.seconds, **extra}
    if args.machine:
        query["machine"] = args.machine
    url = f"{base}/debug/bigmachine/pprof/{page}?{urllib.parse.urlencode(query)}"
    body, headers = _get(url, timeout=args.seconds + EXTRA_SECONDS)
    notes = headers.get("X-Bigpool-Profile-Notes")
    if notes:
        for note in notes.split(" | "):
            print(f"note: {note}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(body.decode("utf-8", "replace"))
        return
    with open(args.output, "wb") as f:
        f.write(body)
    print(f"wrote {fmt} profile of {args.seconds} s to {args.output}", file=sys.stderr)


def _threads(args: argparse.Namespace) -> None:
    base = _base_url(args.url)
    query = f"?{urllib.parse.urlencode({'machine': args.machine})}" if args.machine else ""
    body, _ = _get(f"{base}/debug/bigmachine/pprof/threads{query}", timeout=90)
    sys.stdout.write(body.decode("utf-8", "replace"))


def _command(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m bigpool {name}", description=description)
    parser.add_argument("url", help="the debug endpoint, e.g. http://127.0.0.1:3333")
    return parser


def _run(name: str, run: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    try:
        run(args)
    except _Failure as exc:
        print(f"python -m bigpool {name}: {exc}", file=sys.stderr)
        return 1
    return 0


def status(argv: list[str]) -> int:
    """``python -m bigpool status URL [--json]``; the exit status."""
    parser = _command("status", "The machines and the pool of a running cluster.")
    parser.add_argument("--json", action="store_true", help="print the status JSON")
    return _run("status", _status, parser.parse_args(argv))


def profile(argv: list[str]) -> int:
    """``python -m bigpool profile URL [--seconds N] [--machine ADDR] [-o FILE]``; the exit
    status."""
    parser = _command("profile", "A merged CPU profile of a running cluster.")
    parser.add_argument("--seconds", type=int, default=30, help="how long to sample (1-600)")
    parser.add_argument("--machine", help="one machine's address (or 'driver') instead of all")
    parser.add_argument("-o", "--output", help="file to write: .svg, .pb.gz or .txt")
    parser.add_argument("--format", choices=sorted(_FORMATS), help="override the format")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 600:
        parser.error(f"--seconds must be from 1 to 600, not {args.seconds}")
    return _run("profile", _profile, args)


def threads(argv: list[str]) -> int:
    """``python -m bigpool threads URL [--machine ADDR]``; the exit status."""
    parser = _command("threads", "Every thread's stack, of every process of a running cluster.")
    parser.add_argument("--machine", help="one machine's address (or 'driver') instead of all")
    return _run("threads", _threads, parser.parse_args(argv))
