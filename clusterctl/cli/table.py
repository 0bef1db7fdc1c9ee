"""The instance table both `status` and `status --inventory` print: formatting only, no data access."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click

INSTANCE_HEAD = ["instance", "pid", "state", "uptime", "restarts", "reloads", "cpu", "cpu%", "memory", "requests", "inflight",
                 "errors"]


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


def _opt(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def ws_column(instances: Iterable[Mapping[str, Any]]) -> list[str]:
    """["websockets"] when some instance reports open WebSockets (ASGI workers do), else []: a WSGI cluster's
    table keeps its columns."""
    return ["websockets"] if any(i.get("websockets") is not None for i in instances) else []


def _reloads(i: Mapping[str, Any]) -> str:
    """In-place reloads: the count, and how long ago the last one was ("2 (5m ago)")."""
    last = i.get("last_reload")
    return f"{i.get('reloads') or 0}" + (f" ({fmt_duration(max(0.0, time.time() - last))} ago)" if last else "")


def instance_cells(i: Mapping[str, Any], ws: Sequence[str] = ()) -> list[str]:
    """The INSTANCE_HEAD cells of one instance (plus `ws_column`'s), from `ops.InstanceStatus` as a dict (or its JSON)."""
    return [f"{i.get('instance')}{'' if i.get('configured', True) else '*'}", str(i.get("pid") or "-"),
            f"{i.get('state')}/{i.get('sub_state')}", fmt_duration(i.get("uptime_s")), str(i.get("restarts", 0)),
            _reloads(i),
            _opt(i.get("cpu_s"), "{:.2f}s"), _opt(i.get("cpu_pct"), "{:.0f}%"), fmt_bytes(i.get("memory_bytes")),
            _opt(i.get("requests")), _opt(i.get("in_flight")), _opt(i.get("errors"))] + [_opt(i.get("websockets")) for _ in ws]


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]], state_col: int) -> None:
    """Aligned columns; on a terminal a bold header and rows not active/running in red, plain when piped."""
    tty = sys.stdout.isatty()
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()
    click.echo(click.style(line, bold=True) if tty else line)
    for r in rows:
        text = "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        click.echo(click.style(text, fg="red") if tty and "active/running" not in r[state_col] else text)
