"""The status page: :func:`bigpool.debug.cluster.status`'s dict as HTML or plain text. No I/O.

One table row per machine, the columns a person scans for (state, load, memory, keepalive
latency, errors); the driver and each status provider (the pool) above it as a line of
figures. Values missing from the dict (a machine that did not answer) show as a dash.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from html import escape
from typing import Any

__all__ = ["duration", "human_bytes", "render_html", "render_text"]

_STATE_COLORS = {
    "RUNNING": "#1a7f37",
    "STARTING": "#9a6700",
    "UNSTARTED": "#57606a",
    "STOPPED": "#cf222e",
}


def human_bytes(value: object) -> str:
    """``1536`` -> ``"1.5 KiB"``; a dash for anything not a number."""
    if not isinstance(value, int | float):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # unreachable


def duration(seconds: object) -> str:
    """``3725`` -> ``"1h2m5s"``; a dash for anything not a number."""
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h{minutes}m{secs}s" if hours or days else f"{minutes}m{secs}s"
    return f"{days}d{text}" if days else text


def _get(mapping: object, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _load(m: Mapping[str, Any]) -> str:
    load = m.get("load")
    if not isinstance(load, Mapping):
        return "-"
    values = [load.get(k) for k in ("load1", "load5", "load15")]
    if not all(isinstance(v, int | float) for v in values):
        return "-"
    cpus = load.get("cpus")
    suffix = f" ({cpus} cpu)" if isinstance(cpus, int) else ""
    return " ".join(f"{v:.2f}" for v in values) + suffix


def _memory(m: Mapping[str, Any]) -> str:
    mem = m.get("mem")
    if not isinstance(mem, Mapping):
        return "-"
    return _used(mem)


def _used(usage: Mapping[str, Any]) -> str:
    percent = usage.get("percent")
    share = f" ({percent:.0f}%)" if isinstance(percent, int | float) else ""
    return f"{human_bytes(usage.get('used'))}{share} of {human_bytes(usage.get('total'))}"


def _rss(m: Mapping[str, Any]) -> str:
    return human_bytes(_get(m, "mem", "process_rss"))


def _disk(m: Mapping[str, Any]) -> str:
    disk = m.get("disk")
    if not isinstance(disk, Mapping):
        return "-"
    return _used(disk)


def _keepalive(m: Mapping[str, Any]) -> str:
    times = m.get("keepalive_reply_ms") or []
    return " ".join(f"{t:.1f}" for t in times[:3]) or "-"


def _errors(m: Mapping[str, Any]) -> str:
    parts = []
    if m.get("error"):
        parts.append(str(m["error"]))
    parts.extend(str(e) for e in m.get("info_errors") or [])
    return "; ".join(parts)


_COLUMNS = ("address", "state", "uptime", "procs", "load 1/5/15", "host memory used",
            "machine RSS", "disk used", "keepalive ms", "calls", "error")


def _row(m: Mapping[str, Any]) -> list[str]:
    return [
        str(m.get("addr", "?")),
        str(m.get("state", "?")),
        duration(m.get("uptime_seconds")),
        str(m.get("maxprocs", "-")),
        _load(m),
        _memory(m),
        _rss(m),
        _disk(m),
        _keepalive(m),
        str(m.get("calls_in_flight", "-")),
        _errors(m),
    ]


def _figures(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in values.items():
        name = f"{prefix}{key}".replace("_", " ")
        if isinstance(value, Mapping):
            out.extend(_figures(value, f"{prefix}{key} " if prefix or key != "tasks" else ""))
        elif name.endswith(" per second") and isinstance(value, int | float):
            out.append((name.removesuffix(" per second"), f"{value:.1f}/s"))
        elif isinstance(value, float):
            out.append((name, f"{value:.1f}"))
        elif isinstance(value, list | tuple):
            continue
        else:
            out.append((name, str(value)))
    return out


def _providers(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {k: v for k, v in status.items()
            if k not in ("driver", "machines") and isinstance(v, Mapping)}


def render_html(status: Mapping[str, Any], *, refresh: int | None = None) -> str:
    """The status page. ``refresh``: seconds after which the browser reloads it."""
    driver = status.get("driver") or {}
    machines: list[Mapping[str, Any]] = list(status.get("machines") or [])
    counts: dict[str, int] = {}
    for m in machines:
        counts[str(m.get("state"))] = counts.get(str(m.get("state")), 0) + 1
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())) or "none"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>",
        f"<meta http-equiv='refresh' content='{int(refresh)}'>" if refresh else "",
        "<title>bigpool status</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1.5em;color:#1f2328}"
        "h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:1.4em}"
        "table{border-collapse:collapse;font-size:.85em}"
        "th,td{border-bottom:1px solid #d0d7de;padding:4px 7px;text-align:left;"
        "vertical-align:top;white-space:nowrap}th{background:#f6f8fa}"
        "td.n{text-align:right;font-variant-numeric:tabular-nums}"
        ".state{font-weight:600}.err{color:#cf222e;white-space:normal;max-width:30em}"
        ".fig{display:inline-block;margin:0 1.4em .4em 0}.fig b{font-size:1.3em;display:block}"
        ".muted{color:#57606a}a{color:#0969da}</style></head><body>",
        "<h1>bigpool cluster</h1>",
        f"<p class='muted'>driver pid {escape(str(driver.get('pid', '?')))} on "
        f"{escape(str(driver.get('hostname', '?')))}, system "
        f"<b>{escape(str(driver.get('system', '?')))}</b>, Python "
        f"{escape(str(driver.get('python', '?')))}, up {duration(driver.get('uptime_seconds'))},"
        f" RSS {human_bytes(driver.get('rss'))}; as of {now}</p>",
        "<p><a href='/debug/bigmachine/status?format=json'>JSON</a> · "
        "<a href='/debug/bigmachine/pprof/'>profiles</a> · "
        "<a href='/debug/bigmachine/pprof/flamegraph?seconds=10'>10 s flame graph</a> · "
        "<a href='/debug/vars'>expvars</a></p>",
    ]
    for name, values in _providers(status).items():
        out.append(f"<h2>{escape(name)}</h2><div>")
        for label, value in _figures(values):
            out.append(f"<span class='fig'><b>{escape(value)}</b>{escape(label)}</span>")
        out.append("</div>")
    out.append(f"<h2>machines ({len(machines)}: {escape(summary)})</h2><table><tr>")
    out.extend(f"<th>{escape(c)}</th>" for c in _COLUMNS)
    out.append("</tr>")
    numeric = {2, 3, 6, 9}
    for m in machines:
        cells = _row(m)
        color = _STATE_COLORS.get(cells[1], "#1f2328")
        out.append("<tr>")
        for i, cell in enumerate(cells):
            if i == 1:
                out.append(f"<td class='state' style='color:{color}'>{escape(cell)}</td>")
            elif i == len(cells) - 1:
                out.append(f"<td class='err'>{escape(cell)}</td>")
            else:
                cls = " class='n'" if i in numeric else ""
                out.append(f"<td{cls}>{escape(cell)}</td>")
        out.append("</tr>")
    if not machines:
        out.append(f"<tr><td colspan='{len(_COLUMNS)}' class='muted'>no machines</td></tr>")
    out.append("</table></body></html>\n")
    return "".join(out)


def render_text(status: Mapping[str, Any]) -> str:
    """The status as aligned plain text (for a terminal: ``python -m bigpool status``)."""
    driver = status.get("driver") or {}
    lines = [
        f"driver pid {driver.get('pid', '?')} on {driver.get('hostname', '?')}, system "
        f"{driver.get('system', '?')}, up {duration(driver.get('uptime_seconds'))}",
    ]
    for name, values in _providers(status).items():
        figures = ", ".join(f"{label} {value}" for label, value in _figures(values))
        lines.append(f"{name}: {figures}")
    machines: list[Mapping[str, Any]] = list(status.get("machines") or [])
    rows = [list(_COLUMNS), *(_row(m) for m in machines)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines.append("")
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if not machines:
        lines.append("(no machines)")
    return "\n".join(lines) + "\n"
