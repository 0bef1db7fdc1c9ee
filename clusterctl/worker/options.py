"""The worker's options: one table (`WorkerConfig`'s fields) for defaults, flags and help, the checks that
`clusterctl generate` shares with the worker, and the command-line parser.

The command line the generated units pass is parsed without argparse (whose import and first use add about
0.8 MB resident to every worker); anything else falls back to argparse. The engine's limits take their
defaults from clusterctl.http (`Limits`), the WebSocket ones from clusterctl.http.asgi: defined there once.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from clusterctl.http.asgi import WS_MAX_SIZE, WS_PING
from clusterctl.http.server import ENGINES, Limits

_LIMITS = Limits()  # the engine's own defaults: one place for every limit the worker takes as an option


def size_bytes(text: str | int) -> int:
    """A size in bytes, plain or with K, M or G (x1024, as systemd reads sizes): `16M`, `16MiB`, `512k`.
    ValueError otherwise (as int() raises it), so both option parsers report it like any bad number."""
    if isinstance(text, int):  # a default, already a number
        return text
    m = re.fullmatch(r"\s*(\d+)\s*(?:([KMG])(?:iB|B)?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size in bytes: {text!r}")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


def opt(default: Any, text: str, kind: Any = None) -> Any:
    """A WorkerConfig field that is also an option `--field-name`: its default, its help text and how a value is
    read (`kind`: the default's type unless given; bool fields are --X/--no-X pairs)."""
    return field(default=default, metadata={"help": text, "kind": kind or type(default)})


@dataclass(slots=True)
class WorkerConfig:
    """Everything a worker needs, parsed from the command line (ExecStart=) or `clusterctl run`: the one table
    of the worker's options (`OPTIONS` and both parsers are derived from these fields)."""

    app: str = field(metadata={"help": "WSGI or ASGI app as MODULE:CALLABLE (imported with the working directory "
                                       "on sys.path)", "kind": str})
    interface: str = opt("auto", "auto (detect), wsgi or asgi (ASGI 3; ASGI 2 double-callables adapted)")
    name: str = opt("clusterctl", "cluster name, for logs and journal fields")
    instance: str = opt("", "systemd instance (%%i); also $CLUSTERCTL_INSTANCE")
    bind: list[str] = field(default_factory=list, metadata={
        "help": "listen on ADDR yourself (host:port, [v6]:port, unix:/path); repeatable; for local development "
                "without systemd", "kind": list})
    drain_timeout: float = opt(30.0, "seconds to finish in-flight requests after SIGTERM")
    timeout: float = opt(30.0, "replace the worker when one request's app code runs longer than S seconds "
                               "(named in the journal; gunicorn's --timeout)")
    ready_path: str = opt("", "before serving and READY=1, GET PATH through the worker's own engine "
                              "(in-process) until it answers 2xx; default: ready once imported")
    threads: int = opt(0, "run requests in a pool of N threads (0: inline on the event loop)")
    access_log: bool = opt(True, "access log lines (stdout, or the journal under systemd)")
    journal: bool = opt(True, "under systemd, send access logs as structured journal entries")
    keepalive_timeout: float = opt(_LIMITS.keepalive_timeout, "close idle keep-alive connections after S seconds")
    header_timeout: float = opt(_LIMITS.header_timeout, "seconds allowed to receive a request head (slowloris)")
    body_timeout: float = opt(_LIMITS.body_timeout, "seconds allowed for a request body (plus 1 s per "
                                                    "--min-body-rate bytes received) and for a stalled write")
    max_request_line: int = opt(_LIMITS.max_request_line, "longest request target in bytes (414 above)")
    max_header_field: int = opt(_LIMITS.max_header_field, "largest single header field (name and value) in bytes "
                                                          "(431 above)")
    max_header_size: int = opt(_LIMITS.max_header_size, "largest total header size in bytes (431 above)")
    max_headers: int = opt(_LIMITS.max_headers, "most request headers (431 above)")
    max_body_size: int = opt(_LIMITS.max_body_size, "largest request body in bytes (413 above)")
    max_connections: int = opt(_LIMITS.max_connections, "open connections per worker; above it the longest idle "
                               "or slowest client is closed to make room (503 when none can be)")
    max_buffered: int = opt(_LIMITS.max_buffered, "request body bytes the worker buffers across all connections "
                            "(K, M, G allowed); a body that would pass it is answered 503", size_bytes)
    forwarded_allow_ips: str = opt("", "behind a proxy: peers (IPs, networks, * or unix, comma-separated) whose "
                                       "Forwarded / X-Forwarded-For / X-Forwarded-Proto set the client and "
                                       "scheme; off when empty")
    proxy_protocol: bool = opt(False, "every connection starts with a PROXY protocol v1/v2 header (HAProxy "
                                      "send-proxy, cloud balancers) naming the client")
    min_body_rate: int = opt(_LIMITS.min_body_rate, "a request body may take --body-timeout plus 1 s per N bytes "
                                                    "received (408 after)")
    max_requests: int = opt(0, "drain and exit 0 after N requests (systemd restarts it; 0: never)")
    max_requests_jitter: int = opt(0, "add 0..N to --max-requests so workers differ")
    max_memory_restart: int = opt(0, "drain and exit 0 (systemd restarts it) once resident memory passes SIZE "
                                     "(bytes, or with K, M, G: 512M); checked each second between requests; "
                                     "0: never", size_bytes)
    backlog: int = opt(4096, "listen backlog re-applied to the socket (match the unit's Backlog=)")
    loop: str = opt("uvloop", "event loop: uvloop (default) or asyncio")
    engine: str = opt("auto", "HTTP engine for a WSGI app: auto (the compiled lane where it was built and applies, "
                              "else python), compiled (an error where it cannot be used) or python")
    ws_max_size: int = opt(WS_MAX_SIZE, "ASGI WebSockets: largest message in bytes (closes with 1009 above)")
    ws_per_message_deflate: bool = opt(True, "ASGI WebSockets: accept permessage-deflate")
    ws_ping_interval: float = opt(WS_PING, "ASGI WebSockets: send a keepalive ping every S seconds (0: no pings)")
    ws_ping_timeout: float = opt(WS_PING, "ASGI WebSockets: close with 1011 when nothing (no pong, no data) came "
                                          "back within S seconds of a ping")

    def limits(self) -> Limits:
        """The engine's Limits from these options (the fields of the same names)."""
        values = {f: getattr(self, f) for f in Limits.__dataclass_fields__}
        values["min_body_rate"] = max(1, self.min_body_rate)
        return Limits(**values)


# (flag, dest, kind, help), derived from WorkerConfig: what both parsers and `clusterctl run` read.
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--" + f.name.replace("_", "-"), f.name, f.metadata["kind"], f.metadata["help"]) for f in fields(WorkerConfig)
]

WS_PING_MAX = 3600.0


def ws_problem(max_size: int, ping_interval: float, ping_timeout: float) -> tuple[str, str] | None:
    """The first bad WebSocket setting as (what is wrong, the fix), or None. One check for the worker and for
    `clusterctl generate`, so a generated unit never carries a value its worker would refuse."""
    if max_size < 1:
        return (f"--ws-max-size {max_size} is not a positive number of bytes",
                "e.g. --ws-max-size 1048576 for 1 MiB (the default is 16 MiB)")
    if not 0 <= ping_interval <= WS_PING_MAX:  # also refuses nan
        return (f"--ws-ping-interval {ping_interval:g} is out of range",
                f"use 0 (no pings) to {WS_PING_MAX:g} seconds, e.g. --ws-ping-interval 20")
    if not 0 < ping_timeout <= WS_PING_MAX:
        return (f"--ws-ping-timeout {ping_timeout:g} is out of range",
                f"use more than 0 and at most {WS_PING_MAX:g} seconds (turn pings off with --ws-ping-interval 0)")
    return None


# Set by `clusterctl generate` from its own options; --worker-args may not repeat them.
GENERATE_OWNS = {"--app": "--app", "--name": "--name", "--instance": "(the unit's %i)",
                 "--drain-timeout": "--drain-timeout", "--timeout": "--timeout", "--backlog": "--backlog",
                 "--interface": "--interface",
                 "--bind": "--listen", "--ws-max-size": "--ws-max-size",
                 "--ws-per-message-deflate": "--[no-]ws-per-message-deflate",
                 "--no-ws-per-message-deflate": "--[no-]ws-per-message-deflate",
                 "--ws-ping-interval": "--ws-ping-interval", "--ws-ping-timeout": "--ws-ping-timeout"}


TIMEOUT_MAX = 86400.0


def timeout_problem(timeout: float) -> tuple[str, str] | None:
    """Why --timeout is refused (as (what, fix)), or None: one check for the worker and `clusterctl generate`."""
    if not 0 < timeout <= TIMEOUT_MAX:  # also refuses nan
        return (f"--timeout {timeout:g} is out of range",
                f"use more than 0 and at most {TIMEOUT_MAX:g} seconds, e.g. --timeout 30 (a request's app code "
                "running longer gets the worker replaced)")
    return None


def forwarded_problem(spec: str) -> tuple[str, str] | None:
    if not spec:
        return None
    from clusterctl.http.proxy import parse_trusted  # only when set: ipaddress stays out of a plain worker

    try:
        parse_trusted(spec)
    except ValueError as e:
        return (f"--forwarded-allow-ips {spec!r}: {e}", "list proxy addresses or networks, e.g. 127.0.0.1,10.0.0.0/8")
    return None


def ready_path_problem(path: str) -> tuple[str, str] | None:
    if path and (not path.startswith("/") or re.search(r"[\s\x00-\x1f\x7f#]", path)):
        return (f"--ready-path {path!r} is not a request path", "e.g. --ready-path /health")
    return None


def extra_args_problem(words: list[str]) -> tuple[str, str] | None:
    """Why the worker would refuse these options in a unit's ExecStart= (as (what, fix)), or None: the check
    behind `clusterctl generate --worker-args`, so a typo fails there and not at the workers' start."""
    for word in words:
        flag = word.partition("=")[0]
        if flag in GENERATE_OWNS:
            return (f"--worker-args {flag}: generate sets it itself",
                    f"use clusterctl generate {GENERATE_OWNS[flag]} instead")
    parsed = _parse_plain(["--app", "m:a", *words])
    if parsed is None or parsed["app"] != "m:a":
        return (f"--worker-args {' '.join(words)!r} is not understood by the worker",
                "give full option names with plain values, e.g. --worker-args '--threads 8 --max-requests 1000' "
                "(python -m clusterctl.worker --help lists them)")
    bad = (ready_path_problem(parsed.get("ready_path", "")) or forwarded_problem(parsed.get("forwarded_allow_ips", ""))
           or engine_problem(parsed.get("engine", "auto")))
    if bad:
        return bad
    if parsed.get("loop", "uvloop") not in ("uvloop", "asyncio"):
        return (f"--worker-args --loop {parsed['loop']!r} is not an event loop", "use --loop uvloop or --loop asyncio")
    return None


def problem(cfg: WorkerConfig) -> tuple[str, str] | None:
    """The first setting the worker refuses, as (what is wrong, the fix), or None."""
    return (ws_problem(cfg.ws_max_size, cfg.ws_ping_interval, cfg.ws_ping_timeout)
            or ready_path_problem(cfg.ready_path) or timeout_problem(cfg.timeout)
            or forwarded_problem(cfg.forwarded_allow_ips) or engine_problem(cfg.engine))


def engine_problem(engine: str) -> tuple[str, str] | None:
    if engine not in ENGINES:
        return f"--engine {engine!r} is not an engine", f"use one of {', '.join(ENGINES)}"
    return None


def parse_args(argv: list[str] | None = None) -> WorkerConfig:
    args = sys.argv[1:] if argv is None else argv
    fast = _parse_plain(args)
    cfg = WorkerConfig(**fast) if fast is not None else _parse_argparse(args)
    if not cfg.instance:
        cfg.instance = os.environ.get("CLUSTERCTL_INSTANCE", "")
    return cfg


def _parse_plain(argv: list[str]) -> dict[str, Any] | None:
    """The plain case without argparse: every option by its full name (`--flag VALUE`, `--flag=VALUE`,
    `--X`/`--no-X`), values that do not start with "-" and convert, --app given. None for anything else
    (help, abbreviations, negative numbers, errors), which argparse then handles exactly as it always did;
    for what this accepts, argparse gives the same values (tests/test_footprint.py checks both)."""
    table: dict[str, tuple[str, Any, bool]] = {}
    for flag, dest, typ, _ in OPTIONS:
        table[flag] = (dest, typ, True)
        if typ is bool:
            table["--no-" + flag[2:]] = (dest, typ, False)
    values: dict[str, Any] = {"bind": []}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        i += 1
        spec = table.get(name)
        if spec is None:
            return None
        dest, typ, on = spec
        if typ is bool:
            if eq:
                return None
            values[dest] = on
            continue
        if not eq:
            if i == len(argv):
                return None
            value = argv[i]
            i += 1
        if not value or value.startswith("-"):
            return None
        if typ is list:
            values[dest].append(value)
            continue
        try:
            values[dest] = typ(value)
        except ValueError:
            return None
    return values if "app" in values else None


def _parse_argparse(argv: list[str]) -> WorkerConfig:
    import argparse

    defaults = WorkerConfig(app="")
    parser = argparse.ArgumentParser(prog="python -m clusterctl.worker",
                                     description="Serve a WSGI or ASGI app on the sockets systemd passes.")
    for flag, dest, typ, text in OPTIONS:
        default = getattr(defaults, dest)
        if typ is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
        elif typ is list:
            parser.add_argument(flag, dest=dest, action="append", default=[], metavar="ADDR", help=text)
        else:
            parser.add_argument(flag, dest=dest, type=typ, default=default, required=dest == "app",
                                help=text + (f" (default {default})" if dest != "app" else ""))
    return WorkerConfig(**vars(parser.parse_args(argv)))
