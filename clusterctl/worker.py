"""`python -m clusterctl.worker`: the process systemd starts for each instance, and the app-facing API.

Apps may import `instance` (the systemd instance name, `%i`) and `name` to tell workers apart, read
`state` (the merged broadcasts, see clusterctl.messaging) and register `on_message` handlers; all of it
works when the app imports this module before the runtime starts. This module stays cheap to import
(os only): the worker starts on every restart, and `clusterctl run` shares its option table through
`OPTIONS`. The command line the generated units pass is parsed without argparse (whose import and first
use add about 0.8 MB resident to every worker); anything else falls back to argparse.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m clusterctl.worker` (ExecStart=): run the copy of this module that apps import as
    # `clusterctl.worker`, instead of defining everything twice (once as __main__, once on import).
    import sys

    from clusterctl.worker import main

    sys.exit(main())

import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from clusterctl.http.asgi import WS_MAX_SIZE, WS_PING
from clusterctl.http.server import Limits

_LIMITS = Limits()  # the engine's own defaults: one place for every limit the worker takes as an option

#: The systemd instance of this worker (`%i`, e.g. "1"), or "" outside a template unit.
instance: str = os.environ.get("CLUSTERCTL_INSTANCE", "")
#: The cluster's name (`--name`), or "".
name: str = os.environ.get("CLUSTERCTL_NAME", "")


class State(Mapping[str, Any]):
    """The last broadcast value of every key (`clusterctl broadcast NAME '{"usersCount": 42}'` sets
    `state["usersCount"]`), read-only. The event loop swaps in a whole new mapping per broadcast, so a
    request thread reads without locks and never sees half an update; `snapshot()` pins one version for
    reading several keys consistently. Loaded from the runtime directory before READY=1."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: Mapping[str, Any] = MappingProxyType({})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"State({dict(self._data)!r})"

    def snapshot(self) -> Mapping[str, Any]:
        """The current version, immutable: later broadcasts do not change it."""
        return self._data


#: The merged broadcasts (a read-only mapping; `from clusterctl.worker import state` works too).
state: State = State()
_handlers: list[Callable[[dict[str, Any]], Any]] = []


def on_message(handler: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """Call `handler(message)` for every message this worker gets (broadcast or sent to it), and once on
    start with the saved state when there is one. It runs on the event loop: it must not block (hand slow
    work to a thread). An `async def` handler (natural in ASGI apps) runs as a task on the loop, so it may
    await. An exception is logged and never stops the worker. Usable as a decorator."""
    if not callable(handler):
        raise TypeError("on_message needs a callable")
    _handlers.append(handler)
    return handler


def _set_state(value: dict[str, Any]) -> None:
    """The runtime's side: replace the state in one reference assignment (atomic for readers)."""
    state._data = MappingProxyType(dict(value))


@dataclass(slots=True)
class WorkerConfig:
    """Everything a worker needs, parsed from the command line (ExecStart=) or `clusterctl run`."""

    app: str
    name: str = "clusterctl"
    instance: str = ""
    bind: list[str] = field(default_factory=list)
    drain_timeout: float = 30.0
    timeout: float = 30.0
    threads: int = 0
    access_log: bool = True
    journal: bool = True
    keepalive_timeout: float = _LIMITS.keepalive_timeout
    header_timeout: float = _LIMITS.header_timeout
    body_timeout: float = _LIMITS.body_timeout
    max_request_line: int = _LIMITS.max_request_line
    max_header_field: int = _LIMITS.max_header_field
    max_header_size: int = _LIMITS.max_header_size
    max_headers: int = _LIMITS.max_headers
    max_body_size: int = _LIMITS.max_body_size
    max_connections: int = _LIMITS.max_connections
    min_body_rate: int = _LIMITS.min_body_rate
    max_buffered: int = _LIMITS.max_buffered
    forwarded_allow_ips: str = ""
    proxy_protocol: bool = False
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory_restart: int = 0
    ready_path: str = ""
    backlog: int = 4096
    loop: str = "uvloop"
    interface: str = "auto"
    ws_max_size: int = WS_MAX_SIZE
    ws_per_message_deflate: bool = True
    ws_ping_interval: float = WS_PING
    ws_ping_timeout: float = WS_PING

    def limits(self) -> Limits:
        """The engine's Limits from these options (the fields of the same names)."""
        values = {f: getattr(self, f) for f in Limits.__dataclass_fields__}
        values["min_body_rate"] = max(1, self.min_body_rate)
        return Limits(**values)


def size_bytes(text: str | int) -> int:
    """A size in bytes, plain or with K, M or G (x1024, as systemd reads sizes): `16M`, `16MiB`, `512k`.
    ValueError otherwise (as int() raises it), so both option parsers report it like any bad number."""
    if isinstance(text, int):  # a default, already a number
        return text
    m = re.fullmatch(r"\s*(\d+)\s*(?:([KMG])(?:iB|B)?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size in bytes: {text!r}")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


# (flag, dest, type, help). Booleans are --X/--no-X pairs. Defaults come from WorkerConfig.
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--app", "app", str, "WSGI or ASGI app as MODULE:CALLABLE (imported with the working directory on sys.path)"),
    ("--interface", "interface", str, "auto (detect), wsgi or asgi (ASGI 3; ASGI 2 double-callables adapted)"),
    ("--name", "name", str, "cluster name, for logs and journal fields"),
    ("--instance", "instance", str, "systemd instance (%%i); also $CLUSTERCTL_INSTANCE"),
    ("--bind", "bind", list, "listen on ADDR yourself (host:port, [v6]:port, unix:/path); repeatable; "
                             "for local development without systemd"),
    ("--drain-timeout", "drain_timeout", float, "seconds to finish in-flight requests after SIGTERM"),
    ("--timeout", "timeout", float, "replace the worker when one request's app code runs longer than S seconds "
                                    "(named in the journal; gunicorn's --timeout)"),
    ("--ready-path", "ready_path", str, "before serving and READY=1, GET PATH through the worker's own engine "
                                        "(in-process) until it answers 2xx; default: ready once imported"),
    ("--threads", "threads", int, "run requests in a pool of N threads (0: inline on the event loop)"),
    ("--access-log", "access_log", bool, "access log lines (stdout, or the journal under systemd)"),
    ("--journal", "journal", bool, "under systemd, send access logs as structured journal entries"),
    ("--keepalive-timeout", "keepalive_timeout", float, "close idle keep-alive connections after S seconds"),
    ("--header-timeout", "header_timeout", float, "seconds allowed to receive a request head (slowloris)"),
    ("--body-timeout", "body_timeout", float, "seconds allowed for a request body (plus 1 s per --min-body-rate "
                                              "bytes received) and for a stalled write"),
    ("--max-request-line", "max_request_line", int, "longest request target in bytes (414 above)"),
    ("--max-header-field", "max_header_field", int, "largest single header field (name and value) in bytes "
                                                    "(431 above)"),
    ("--max-header-size", "max_header_size", int, "largest total header size in bytes (431 above)"),
    ("--max-headers", "max_headers", int, "most request headers (431 above)"),
    ("--max-body-size", "max_body_size", int, "largest request body in bytes (413 above)"),
    ("--max-connections", "max_connections", int, "open connections per worker; above it the longest idle or "
                                                   "slowest client is closed to make room (503 when none can be)"),
    ("--max-buffered", "max_buffered", size_bytes, "request body bytes the worker buffers across all connections "
                                                   "(K, M, G allowed); a body that would pass it is answered 503"),
    ("--forwarded-allow-ips", "forwarded_allow_ips", str, "behind a proxy: peers (IPs, networks, * or unix, "
                                                         "comma-separated) whose Forwarded / X-Forwarded-For / "
                                                         "X-Forwarded-Proto set the client and scheme; off when empty"),
    ("--proxy-protocol", "proxy_protocol", bool, "every connection starts with a PROXY protocol v1/v2 header "
                                                 "(HAProxy send-proxy, cloud balancers) naming the client"),
    ("--min-body-rate", "min_body_rate", int, "a request body may take --body-timeout plus 1 s per N bytes "
                                              "received (408 after)"),
    ("--max-requests", "max_requests", int, "drain and exit 0 after N requests (systemd restarts it; 0: never)"),
    ("--max-requests-jitter", "max_requests_jitter", int, "add 0..N to --max-requests so workers differ"),
    ("--max-memory-restart", "max_memory_restart", size_bytes, "drain and exit 0 (systemd restarts "
     "it) once resident memory passes SIZE (bytes, or with K, M, G: 512M); checked each second between "
     "requests; 0: never"),
    ("--backlog", "backlog", int, "listen backlog re-applied to the socket (match the unit's Backlog=)"),
    ("--loop", "loop", str, "event loop: uvloop (default) or asyncio"),
    ("--ws-max-size", "ws_max_size", int, "ASGI WebSockets: largest message in bytes (closes with 1009 above)"),
    ("--ws-per-message-deflate", "ws_per_message_deflate", bool, "ASGI WebSockets: accept permessage-deflate"),
    ("--ws-ping-interval", "ws_ping_interval", float, "ASGI WebSockets: send a keepalive ping every S seconds "
                                                      "(0: no pings)"),
    ("--ws-ping-timeout", "ws_ping_timeout", float, "ASGI WebSockets: close with 1011 when nothing (no pong, no "
                                                    "data) came back within S seconds of a ping"),
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
    bad = ready_path_problem(parsed.get("ready_path", "")) or forwarded_problem(parsed.get("forwarded_allow_ips", ""))
    if bad:
        return bad
    if parsed.get("loop", "uvloop") not in ("uvloop", "asyncio"):
        return (f"--worker-args --loop {parsed['loop']!r} is not an event loop", "use --loop uvloop or --loop asyncio")
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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from clusterctl import runtime
    from clusterctl.errors import ClusterctlError

    try:
        return runtime.run(cfg)
    except ClusterctlError as e:
        print(f"clusterctl worker: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code

