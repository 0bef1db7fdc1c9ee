"""The plan: every decision `generate` makes, validated before a single file is written.

CLI options go in as strings; a frozen `Plan` comes out, or a `ClusterctlError` naming the option and
the fix. Rendering (generate.py) and later operations read only the plan, never raw options.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shlex
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from clusterctl import appspec
from clusterctl.address import Address
from clusterctl.address import parse as parse_address
from clusterctl.control.cores import CpuBudget, usable_cpus
from clusterctl.control.unitnames import UnitNames
from clusterctl.errors import ClusterctlError, CommandError
from clusterctl.proc import run
from clusterctl.worker.options import WorkerConfig, extra_args_problem, size_bytes, timeout_problem, ws_problem

Balance = Literal["shared", "reuseport"]
ProtectHome = Literal["no", "read-only", "tmpfs", "yes"]
PROTECT_HOME: tuple[str, ...] = ("no", "read-only", "tmpfs", "yes")
# What ProtectHome= hides or freezes: the interpreter, app and --rw-path must not lie under it.
HOME_DIRS = ("/home", "/root", "/run/user")

# Unit names allow more, but this set needs no escaping anywhere (paths, journal fields, shell).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SIZE_RE = re.compile(r"^(\d+(\.\d+)?[KMGT]?|\d{1,3}%|infinity)$")
PERCENT_RE = re.compile(r"^(\d{1,5})%?$")
TASKS_RE = re.compile(r"^([1-9]\d{0,6}|\d{1,3}%|infinity)$")

DEFAULT_PORT = 8000
DRAIN_TIMEOUT = 30  # as --timeout: a deploy lets every request the timeout allows finish (gunicorn: 30 and 30)
WATCHDOG_SEC = 10
BACKLOG = 4096
# ASGI WebSocket settings: the worker's own defaults, so a unit names only the ones that differ.
_WORKER = WorkerConfig(app="")
WS_MAX_SIZE: int = _WORKER.ws_max_size
WS_DEFLATE: bool = _WORKER.ws_per_message_deflate
WS_PING_INTERVAL: float = _WORKER.ws_ping_interval
WS_PING_TIMEOUT: float = _WORKER.ws_ping_timeout
TIMEOUT = int(_WORKER.timeout)  # the worker's --timeout: a request's app code running longer replaces the worker


Listen = Address  # one address the socket unit listens on (clusterctl.address)


@dataclass(frozen=True)
class OptionSpec:
    """How one plan option is spelt: its click option (command line, clusterctl.toml) and its words in the
    units' header. The field of `PlanOptions` carrying it gives the key and the default."""

    flag: str  # "--memory-max"; a switch "--harden/--no-harden", or "--allow-wx" alone
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    bytes: bool = False  # a size in bytes with K, M or G allowed
    show_default: bool = False
    # The header: the Plan attribute that holds the value ("" for none: not in the header), written always or
    # only where it differs from the default; `words` writes it otherwise.
    attr: str | None = None
    always: bool = False
    words: Callable[[Any], list[str]] | None = None


def _opt(default: Any, flag: str, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"option": OptionSpec(flag, help, **spec)})


@dataclass(frozen=True)
class PlanOptions:
    """Every option that makes a Plan, in the order the units' header names them: the one table from which
    `generate`/`up`'s click options, build_plan's keywords and the header's command line all come. Values
    are as given (strings, before validation); a new option is one field here, plus its use in build_plan."""

    app: str | None = _opt(None, "--app", "The WSGI/ASGI app, e.g. myproject.wsgi:application (default: every app "
                           "of ./clusterctl.toml).", metavar="MODULE:CALLABLE", always=True)
    name: str | None = _opt(None, "--name", "Unit name prefix (default: the app module's last part).",
                            metavar="NAME", always=True)
    workers: str = _opt("auto", "--workers", "Worker instances; auto = usable CPUs (affinity and cgroup quota).",
                        metavar="auto|N", show_default=True, always=True)
    python: str | None = _opt(None, "--python", "Interpreter with the app and clusterctl installed (default: this "
                              "one).", metavar="PATH", always=True)
    working_dir: str | None = _opt(None, "--working-dir", "Directory the app is imported from (default: cwd).",
                                   metavar="DIR", always=True)
    listen: tuple[str, ...] = _opt((), "--listen", "PORT, IPv4:PORT, [IPv6]:PORT or unix:/path; repeatable (default "
                                   "127.0.0.1:8000).", metavar="ADDR",
                                   words=lambda plan: [w for a in plan.listen for w in ("--listen", a.spec)])
    balance: str = _opt("shared", "--balance", "shared: one socket, one queue; reuseport: a socket per worker, "
                        "kernel-hashed.", choices=("shared", "reuseport"), show_default=True)
    interface: str = _opt("auto", "--interface", "The app's interface: auto detects WSGI, ASGI 3 or ASGI 2 when the "
                          "worker imports it.", choices=("auto", "wsgi", "asgi"), show_default=True)
    user: str | None = _opt(None, "--user", "Run the workers as this user (default: a DynamicUser= per worker).",
                            metavar="USER")
    env: tuple[str, ...] = _opt((), "--env", "Environment for the workers; repeatable.", metavar="KEY=VALUE",
                                words=lambda plan: [w for k, v in plan.env for w in ("--env", f"{k}={v}")])
    harden: bool = _opt(True, "--harden/--no-harden", "Sandbox the workers (ProtectSystem=strict, no capabilities, "
                        "syscall filter; see README: Hardening).", show_default=True)
    protect_home: str | None = _opt(
        None, "--protect-home", "ProtectHome= (default: yes, or read-only when the app or python lives under /home "
        "or /root).", choices=PROTECT_HOME,  # written when not the default, also when derived: the same value again
        words=lambda plan: [] if plan.protect_home == ("yes" if plan.harden else "no")
        else ["--protect-home", plan.protect_home])
    rw_path: tuple[str, ...] = _opt((), "--rw-path", "A directory the workers may write (ReadWritePaths=); everything "
                                    "else is read-only. Repeatable.", metavar="DIR", attr="rw_paths")
    allow_wx: bool = _opt(False, "--allow-wx", "Drop MemoryDenyWriteExecute= for libraries that need W+X memory "
                          "(cffi ABI-mode ffi.callback(), JITs).")
    memory_high: str | None = _opt(None, "--memory-high", "Soft memory limit per worker, reclaimed above "
                                   "(MemoryHigh=).", metavar="SIZE")
    memory_max: str | None = _opt(None, "--memory-max", "Hard memory limit per worker (MemoryMax=), e.g. 512M.",
                                  metavar="SIZE")
    cpu_quota: str | None = _opt(None, "--cpu-quota", "CPU limit per worker (CPUQuota=), e.g. 150%.", metavar="PCT")
    tasks_max: str | None = _opt(None, "--tasks-max", "Most threads and processes per worker (TasksMax=), e.g. 64.",
                                 metavar="N")
    backlog: int = _opt(BACKLOG, "--backlog", "Listen queue length (Backlog=).", show_default=True)
    drain_timeout: int = _opt(DRAIN_TIMEOUT, "--drain-timeout", "Seconds a stopping worker may finish in-flight "
                              "requests.", show_default=True)
    watchdog_sec: int = _opt(WATCHDOG_SEC, "--watchdog-sec", "Restart a worker whose event loop is blocked this long "
                             "outside a request's app code (0: off).", show_default=True)
    timeout: int = _opt(TIMEOUT, "--timeout", "Replace a worker whose request has run app code this long (named in "
                        "the journal; gunicorn's --timeout).", metavar="SECONDS", show_default=True)
    worker_args: tuple[str, ...] = _opt(
        (), "--worker-args", "More worker options for ExecStart=, checked by the worker's parser, e.g. --worker-args "
        "'--threads 8 --max-requests 1000 --keepalive-timeout 75'; repeatable.", metavar="'OPTIONS'",
        words=lambda plan: ["--worker-args", shlex.join(plan.worker_args)] if plan.worker_args else [])
    every: str | None = _opt(None, "--every", "Run --task this often (a systemd time span: 10s, 5min); NAME-task.timer "
                             "+ NAME-task.service.", metavar="SPAN")
    task: str | None = _opt(None, "--task", "Periodic primary task: FUNC's returned JSON object is broadcast to every "
                            "worker (worker.state).", metavar="MODULE:FUNC")
    ws_max_size: int = _opt(WS_MAX_SIZE, "--ws-max-size", "ASGI WebSockets: largest message (bytes; K, M, G allowed); "
                            "a larger one closes with 1009.", metavar="BYTES", bytes=True, show_default=True)
    ws_per_message_deflate: bool = _opt(WS_DEFLATE, "--ws-per-message-deflate/--no-ws-per-message-deflate",
                                        "ASGI WebSockets: accept permessage-deflate compression when the client "
                                        "offers it.", show_default=True)
    ws_ping_interval: float = _opt(WS_PING_INTERVAL, "--ws-ping-interval", "ASGI WebSockets: send a keepalive ping "
                                   "this often (0: no pings).", metavar="SECONDS", show_default=True)
    ws_ping_timeout: float = _opt(WS_PING_TIMEOUT, "--ws-ping-timeout", "ASGI WebSockets: close with 1011 when "
                                  "nothing came back this long after a ping.", metavar="SECONDS", show_default=True)
    check_import: bool = _opt(True, "--check-import/--no-check-import", "Import the app (and --task) with the target "
                              "python before writing anything.", show_default=True, attr="")


def plan_option_specs() -> list[tuple[str, Any, OptionSpec]]:
    """(key, default, spec) of every plan option, in the table's order."""
    return [(f.name, f.default, f.metadata["option"]) for f in fields(PlanOptions)]


def _word(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def option_words(plan: Plan) -> list[str]:
    """The command-line words of every plan option that shaped `plan` (the units' header): those written
    always, and the others where the plan differs from the option's default."""
    out: list[str] = []
    for key, default, spec in plan_option_specs():
        if spec.words is not None:
            out += spec.words(plan)
            continue
        if spec.attr == "":
            continue
        value = getattr(plan, spec.attr or key)
        on, _, off = spec.flag.partition("/")
        if isinstance(default, bool):
            out += [] if value == default else [on if value else off]
        elif isinstance(default, tuple):
            out += [w for v in value for w in (on, _word(v))]
        elif spec.always or (value is not None and value != default):
            out += [on, _word(value)]
    return out


@dataclass(frozen=True)
class Plan:
    """Everything needed to render a cluster's units."""

    name: str
    app: str
    workers: int
    listen: tuple[Listen, ...]
    balance: Balance
    python: str
    working_dir: str
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    memory_max: str | None = None
    memory_high: str | None = None
    cpu_quota: str | None = None
    tasks_max: str | None = None
    harden: bool = True
    rw_paths: tuple[str, ...] = ()
    protect_home: ProtectHome = "yes"
    allow_wx: bool = False
    bind_ro: tuple[str, ...] = ()
    backlog: int = BACKLOG
    drain_timeout: int = DRAIN_TIMEOUT
    watchdog_sec: int = WATCHDOG_SEC
    timeout: int = TIMEOUT
    # The app's interface for the worker's --interface: auto (detected at start), wsgi or asgi.
    interface: str = "auto"
    # ASGI WebSockets (the worker's --ws-* flags; ExecStart= carries those that differ from these defaults).
    ws_max_size: int = WS_MAX_SIZE
    ws_per_message_deflate: bool = WS_DEFLATE
    ws_ping_interval: float = WS_PING_INTERVAL
    ws_ping_timeout: float = WS_PING_TIMEOUT
    # Further worker options for ExecStart= (--worker-args), checked by the worker's own parser.
    worker_args: tuple[str, ...] = ()
    # The periodic primary task (NAME-task.timer + NAME-task.service): MODULE:FUNC and its interval.
    task: str | None = None
    every: str | None = None
    cpu_budget: CpuBudget | None = field(default=None, compare=False)
    # The clusterctl.toml table the plan came from ("/srv/app/clusterctl.toml [apps.web]"), for the header.
    config: str | None = None
    # Things that will not stop generate but will likely stop the workers; the CLI prints them.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def instances(self) -> list[int]:
        return list(range(1, self.workers + 1))

    @property
    def service_user(self) -> str | None:
        """User= of the units. With a dynamic user it is named after the cluster, so every instance and the
        task share ONE uid and with it the runtime directory (a nameless DynamicUser= gives each its own)."""
        return self.user or (dynamic_user_name(self.name) if self.harden else None)

    @property
    def ws_args(self) -> list[str]:
        """The worker's --ws-* flags for the settings that differ from its defaults (ExecStart=, the header)."""
        out: list[str] = []
        if self.ws_max_size != WS_MAX_SIZE:
            out += ["--ws-max-size", str(self.ws_max_size)]
        if self.ws_per_message_deflate != WS_DEFLATE:
            out.append("--ws-per-message-deflate" if self.ws_per_message_deflate else "--no-ws-per-message-deflate")
        for flag, value, default in (("--ws-ping-interval", self.ws_ping_interval, WS_PING_INTERVAL),
                                     ("--ws-ping-timeout", self.ws_ping_timeout, WS_PING_TIMEOUT)):
            if value != default:
                out += [flag, str(int(value)) if value.is_integer() else repr(value)]
        return out

    @property
    def units(self) -> UnitNames:
        """The names of this cluster's units and files."""
        return UnitNames(self.name, self.balance)

    @property
    def stop_timeout(self) -> int:
        """TimeoutStopSec: above the drain deadline so the runtime, not SIGKILL, ends the drain."""
        return self.drain_timeout + 5


def socket_unit(name: str, balance: str, instance: int | str | None = None) -> str:
    """The socket unit of a cluster or of one instance (see UnitNames.socket)."""
    return UnitNames(name, balance).socket(instance)


PLAN_FILE_FORMAT = 1


def plan_to_json(plan: Plan) -> str:
    """The plan as the JSON file kept beside the units (NAME.plan.json): what later operations re-render from,
    so none of them reads unit files back. Listen addresses as --listen takes them; what the plan does not
    compare (the CPU reasoning, warnings) is left out."""
    data: dict[str, Any] = {"format": PLAN_FILE_FORMAT}
    for f in fields(Plan):
        if f.compare:
            value = getattr(plan, f.name)
            data[f.name] = [a.spec for a in value] if f.name == "listen" else value
    return json.dumps(data, indent=2) + "\n"


def plan_from_json(text: str, where: str) -> Plan:
    """The Plan of a NAME.plan.json (plan_to_json's), or a ClusterctlError naming the file and the fix."""
    fix = "regenerate the units (clusterctl up again, or clusterctl generate --force and clusterctl install)"
    try:
        data = json.loads(text)
        if data.pop("format", None) != PLAN_FILE_FORMAT:
            raise ValueError("an unknown format")
        known = {f.name for f in fields(Plan) if f.compare}
        values = {k: tuple(map(tuple, v)) if k == "env" else tuple(v) if isinstance(v, list) else v
                  for k, v in data.items() if k in known}
        values["listen"] = tuple(parse_listen(a) for a in data["listen"])
        return Plan(**values)
    except (ValueError, TypeError, KeyError, ClusterctlError) as e:
        raise ClusterctlError(f"{where} is not a plan this clusterctl can read ({e})", fix) from None


def dynamic_user_name(name: str) -> str:
    """`clusterctl-NAME`: the one dynamic user all instances of a cluster share.

    The prefix keeps it clear of the accounts a host already has: a dynamic user named like an existing user
    or group (a cluster called `users` meets Debian's `users` group) fails to start with "User or group with
    specified name already exists". systemd accepts lower case, digits, '_' and '-', at most 31 characters,
    not starting with a digit (measured: 'my.app' fails with 'Invalid argument'); other names get a valid
    form with a hash, so two clusters never share a uid by accident."""
    if re.fullmatch(r"[a-z0-9_-]{1,20}", name):
        return f"clusterctl-{name}"
    base = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")[:10]
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"clusterctl-{base}-{digest}" if base else f"clusterctl-{digest}"


def parse_app(spec: str) -> str:
    appspec.parse(spec, "--app")
    return spec


def parse_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ClusterctlError(
            f"--name {name!r} is not a valid unit name prefix",
            "use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit (no '@', '/' or spaces)",
        )
    return name


def default_name(app: str) -> str:
    """`pkg.web:app` -> `web`: the module's last part, made a valid unit name."""
    base = app.split(":", 1)[0].rsplit(".", 1)[-1].replace("_", "-").strip("-.") or "app"
    return parse_name(base[:64])


def parse_listen(value: str) -> Listen:
    """`PORT`, `IPv4:PORT`, `[IPv6]:PORT`, or `unix:/abs/path` (or just `/abs/path`)."""
    return parse_address(value, "--listen")


def parse_workers(value: str, budget: CpuBudget | None = None) -> tuple[int, CpuBudget | None]:
    if value == "auto":
        budget = budget or usable_cpus()
        return budget.workers, budget
    if not value.isdigit() or int(value) < 1:
        raise ClusterctlError(f"--workers {value!r} must be 'auto' or a whole number >= 1",
                              "pass --workers auto to size to the usable CPUs, or e.g. --workers 4")
    if int(value) > 1024:
        raise ClusterctlError(f"--workers {value} is more than 1024", "use at most a few workers per CPU")
    return int(value), budget


_SPAN_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1, "seconds": 1,
               "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
               "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800}
SPAN_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def timespan_seconds(value: str) -> float:
    """A systemd time span (`10s`, `1min 30s`, `2h`, a bare number is seconds) in seconds; ValueError if not one."""
    text = value.strip().lower()
    pos, total = 0, 0.0
    if not text:
        raise ValueError(value)
    while pos < len(text):
        m = SPAN_RE.match(text, pos)
        if not m or m.group(2) not in (*_SPAN_UNITS, ""):
            raise ValueError(value)
        total += float(m.group(1)) * _SPAN_UNITS.get(m.group(2), 1)
        pos = m.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return total


def parse_task(task: str | None, every: str | None) -> tuple[str | None, str | None]:
    """--task MODULE:FUNC and --every SPAN come together; the span must be one systemd parses, >= 1s."""
    if task is None and every is None:
        return None, None
    if task is None or every is None:
        raise ClusterctlError("--every and --task go together",
                              "pass both, e.g. --every 10s --task myproject.tasks:count_users")
    appspec.parse(task, "--task", form="MODULE:FUNC", fix="name a module and a function returning a JSON object, e.g. "
                  "--task myproject.tasks:count_users")
    try:
        seconds = timespan_seconds(every)
    except ValueError:
        raise ClusterctlError(f"--every {every!r} is not a time span",
                              "use a systemd time span, e.g. --every 10s, --every 5min, --every '1h 30min'") from None
    if seconds < 1:
        raise ClusterctlError(f"--every {every} is shorter than 1s", "run the task at most once a second, e.g. --every 1s")
    return task, " ".join(every.split())


def parse_env(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            raise ClusterctlError(f"--env {item!r} is not KEY=VALUE", "use a shell-style name, e.g. --env DJANGO_DEBUG=0")
        if "\n" in val or "\0" in val:
            raise ClusterctlError(f"--env {key}: the value contains a newline or NUL", "pass a single-line value")
        out.append((key, val))
    return tuple(out)


# Below this a worker cannot even import the runtime (an idle one uses ~20-30M): systemd would OOM-kill it in a loop.
MIN_MEMORY = 32 * 1024**2
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: str | None, option: str) -> str | None:
    """MemoryMax=/MemoryHigh=: a size systemd parses and a worker can live in (>= 32M, or 1-100%)."""
    if value is None:
        return None
    if not SIZE_RE.match(value):
        raise ClusterctlError(f"{option} {value!r} is not a size",
                              f"use bytes with K, M, G or T (e.g. {option} 512M), a percentage, or infinity")
    if value.endswith("%") and not 1 <= int(value[:-1]) <= 100:
        raise ClusterctlError(f"{option} {value} is not a share of the machine's memory",
                              f"use 1% to 100%, or a size such as {option} 512M")
    amount = size_amount(value)
    if amount is not None and amount < MIN_MEMORY:
        raise ClusterctlError(f"{option} {value} is too little for a Python worker (an idle one needs ~25M), so "
                              "systemd would kill every start", f"give it at least 64M, e.g. {option} 512M")
    return value


def size_amount(value: str) -> int | None:
    """Bytes of an absolute size (`512M`), None for a percentage or infinity."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", value)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def check_memory(high: str | None, low_max: str | None) -> None:
    """MemoryHigh= above MemoryMax= never throttles: the hard limit kills first. Compare like with like."""
    if not high or not low_max:
        return
    a, b = size_amount(high), size_amount(low_max)
    if a is None and b is None and high.endswith("%") and low_max.endswith("%"):
        a, b = int(high[:-1]), int(low_max[:-1])
    if a is not None and b is not None and a > b:
        raise ClusterctlError(f"--memory-high {high} is above --memory-max {low_max}: the soft limit must be the lower one",
                              f"e.g. --memory-high {low_max} --memory-max {high}, or drop one of them")


def parse_bytes(value: str, option: str) -> int:
    """A byte count: plain bytes, or with K, M or G (x1024, as systemd reads sizes; `16M`, `16MiB`)."""
    try:
        return size_bytes(value)
    except ValueError:
        raise ClusterctlError(f"{option} {value!r} is not a size in bytes",
                              f"e.g. {option} 1048576 or {option} 1M") from None


def parse_worker_args(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """--worker-args, each a string of worker options split as a shell would (no shell runs it)."""
    words: list[str] = []
    for value in values:
        try:
            words += shlex.split(value)
        except ValueError as e:
            raise ClusterctlError(f"--worker-args {value!r}: {e}", "quote the way a shell does") from e
    bad = extra_args_problem(words)
    if bad:
        raise ClusterctlError(*bad)
    return tuple(words)


def parse_percent(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    m = PERCENT_RE.match(value)
    if not m or int(m.group(1)) == 0:
        raise ClusterctlError(f"{option} {value!r} is not a positive percentage", f"e.g. {option} 150% for one and a half CPUs")
    return f"{int(m.group(1))}%"


def parse_user(user: str | None) -> str | None:
    if user is None:
        return None
    if not re.match(r"^[a-z_][a-z0-9_-]{0,31}\$?$", user) and not user.isdigit():
        raise ClusterctlError(f"--user {user!r} is not a valid user name", "use an existing system user, e.g. --user www-data")
    if user in ("nobody", "65534"):
        raise ClusterctlError(f"--user {user}: nobody owns files of other services, so sharing it is not isolation "
                              "(systemd warns: 'Special user nobody configured, this is not safe!')",
                              "leave --user out for a DynamicUser= per worker, or create a dedicated user")
    try:
        pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ClusterctlError(f"--user {user}: no such user on this host, so every worker would fail (217/USER)",
                              f"create it (useradd --system --no-create-home {user}), or leave --user out for a "
                              "dynamic user") from None
    return user


def parse_rw_paths(paths: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """--rw-path: absolute directories, the only places ProtectSystem=strict leaves writable."""
    out: list[str] = []
    for p in paths:
        if not p.startswith("/") or re.search(r'[\s"\'\\%$;]', p) or "/../" in f"{p}/":
            raise ClusterctlError(f"--rw-path {p!r} must be an absolute path without spaces, quotes, '%', '$' or '..'",
                                  "e.g. --rw-path /var/lib/myapp (or write to /tmp, which is private to each worker)")
        norm = os.path.normpath(p)
        if norm == "/":
            raise ClusterctlError("--rw-path / would make the whole file system writable",
                                  "name the directories the app writes to, or pass --no-harden")
        if norm not in out:
            out.append(norm)
    return tuple(out)


def parse_tasks(value: str | None) -> str | None:
    if value is None:
        return None
    if not TASKS_RE.match(value):
        raise ClusterctlError(f"--tasks-max {value!r} is not a task count",
                              "use a number of threads+processes per worker (e.g. --tasks-max 64), a percentage, or infinity")
    return value


def under(path: str, dirs: tuple[str, ...]) -> str | None:
    """The first of `dirs` that `path` is inside of (or equal to), else None."""
    for d in dirs:
        if path == d or path.startswith(d.rstrip("/") + "/"):
            return d
    return None


def sqlite_databases(directory: str) -> list[str]:
    """SQLite database files directly in `directory` (by their header, whatever their name): the workers'
    read-only file system lets an app open them but not write them (Django's db.sqlite3: login, sessions)."""
    found = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        try:
            if entry.is_file() and entry.stat().st_size >= 100:
                with open(entry.path, "rb") as f:
                    if f.read(16) == b"SQLite format 3\x00":
                        found.append(entry.path)
        except OSError:
            continue
    return found


def readable_by_anyone(path: str) -> bool:
    """Whether any local user could use `path`: every directory on the way, symlinks followed, is
    searchable by others, and the file itself readable. A DynamicUser= worker has no group or owner
    rights, so this is the test that its interpreter and app can be opened (a /root/.pyenv python
    fails it: /root is 0700)."""
    for p in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        parts = p.split("/")
        for k in range(2, len(parts) + 1):
            try:
                st = os.stat("/".join(parts[:k]))
            except OSError:
                return False
            want = 0o005 if stat.S_ISDIR(st.st_mode) else 0o004
            if st.st_mode & want != want:
                return False
    return True


def resolve_python(python: str | None) -> str:
    """The interpreter the workers run: absolute, existing, executable. Symlinks are kept (a venv's
    python is a symlink, and resolving it would lose the venv)."""
    path = python or sys.executable
    if not os.path.isabs(path):
        raise ClusterctlError(f"--python {path!r} is not an absolute path", "pass the full path, e.g. /opt/app/venv/bin/python")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ClusterctlError(f"--python {path}: no executable file there",
                              "point it at the python of the venv that has your app installed")
    return path


def resolve_working_dir(path: str | None) -> str:
    wd = os.path.abspath(path or os.getcwd())
    if not os.path.isdir(wd):
        raise ClusterctlError(f"--working-dir {wd}: not a directory", "pass the directory your app is imported from")
    return wd


_CHECK = r"""
import importlib, importlib.util, json, sys, traceback
sys.path.insert(0, ".")
spec = sys.argv[1]
mod_name, _, attr = spec.partition(":")
def out(**kw):
    print("\n" + json.dumps(kw))
    sys.exit(0)
if importlib.util.find_spec("clusterctl") is None:
    out(error="no-clusterctl")
try:
    obj = importlib.import_module(mod_name)
except ModuleNotFoundError as e:
    out(error="module", detail=str(e), missing=e.name)
except SyntaxError as e:
    out(error="import", detail=f"{type(e).__name__}: {e.msg} ({e.filename}, line {e.lineno})")
except BaseException as e:
    tb = traceback.extract_tb(e.__traceback__)
    at = f" ({tb[-1].filename}, line {tb[-1].lineno})" if tb else ""
    out(error="import", detail=traceback.format_exception_only(e)[-1].strip() + at)
for part in attr.split("."):
    if not hasattr(obj, part):
        out(error="attr", detail=part)
    obj = getattr(obj, part)
out(ok=callable(obj), kind=type(obj).__name__)
"""


IMPORT_TIMEOUT = 30.0


def check_import(app: str, python: str, working_dir: str, option: str = "--app") -> None:
    """Import the app with the workers' python, from their working directory, and confirm a callable.

    Done in a child process so the check sees exactly what a worker will see (its interpreter, its
    site-packages, its cwd) and so the app's import side effects stay out of this process.
    """
    try:
        result = run([python, "-c", _CHECK, app], check=False, cwd=working_dir, timeout=IMPORT_TIMEOUT)
    except CommandError:  # the timeout: say what it means, not the check script's command line
        raise ClusterctlError(
            f"{option} {app}: importing it with {python} did not finish within {IMPORT_TIMEOUT:g}s (does it wait for "
            "a database or the network at import time?)",
            "make the import return promptly (connect on first use), or skip the check with --no-check-import") from None
    lines = (result.stdout or "").strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        verdict = None
    if verdict is None:
        raise ClusterctlError(
            f"{option} {app}: the import check with {python} failed: {(result.stderr or '').strip()[-300:] or 'no output'}",
            "run the python yourself to see why, or skip the check with --no-check-import",
        )
    module = app.partition(":")[0]
    err = verdict.get("error")
    if err == "no-clusterctl":
        raise ClusterctlError(f"--python {python} cannot import clusterctl, so the workers could not start",
                              f"install it there: {python} -m pip install clusterctl")
    if err == "module":
        raise ClusterctlError(f"{option} {app}: module {verdict.get('missing') or module!r} not found from {working_dir}",
                              "check the spelling, pass --working-dir where it lives, or --python of the venv that has it")
    if err == "import":
        raise ClusterctlError(f"{option} {app}: importing {module} raised {verdict.get('detail')}",
                              "fix the app so it imports, then run generate again")
    if err == "attr":
        raise ClusterctlError(f"{option} {app}: module {module} has no attribute {verdict.get('detail')!r}",
                              "name the WSGI callable after the colon, e.g. --app myproject.wsgi:application" if option == "--app"
                              else "name the function after the colon, e.g. --task myproject.tasks:count_users")
    if not verdict.get("ok"):
        raise ClusterctlError(f"{option} {app} is a {verdict.get('kind')}, not a callable",
                              "point --app at the WSGI application object" if option == "--app"
                              else f"point {option} at a function")


def _protect_home(value: str | None, harden: bool, paths: list[tuple[str, str]]) -> str:
    """ProtectHome=: `yes` unless something the workers need lives under /home, /root or /run/user,
    then `read-only` (a --rw-path there stays writable: ReadWritePaths= wins over it); an explicit
    value that would hide one of them is refused."""
    if value is not None and value not in PROTECT_HOME:
        raise ClusterctlError(f"--protect-home {value!r} is not one of {', '.join(PROTECT_HOME)}",
                              "e.g. --protect-home read-only when the app lives in a home directory")
    if not harden:
        return value or "no"
    clashes = [(opt, p, d) for opt, p in paths if (d := under(p, HOME_DIRS))]
    if value is None:
        return "read-only" if clashes else "yes"
    if value in ("yes", "tmpfs") and clashes:
        opt, p, d = clashes[0]
        raise ClusterctlError(f"--protect-home {value} hides {d}, but {opt} {p} is there",
                              "pass --protect-home read-only, or move the app out of home directories")
    return value


def tmp_binds(paths: list[str]) -> tuple[str, ...]:
    """PrivateTmp= gives each worker an empty /tmp and /var/tmp; an app or venv that lives there (a CI
    checkout, a demo) is bound back in read-only (BindReadOnlyPaths=), top-level entry by entry."""
    out: list[str] = []
    for p in paths:
        for tmp in ("/tmp", "/var/tmp"):
            if p.startswith(tmp + "/"):
                top = f"{tmp}/{p[len(tmp) + 1:].split('/', 1)[0]}"
                if top not in out and not re.search(r'[\s"\'\\%$;:]', top):
                    out.append(top)
    return tuple(out)


def build_plan(*, check: bool = True, budget: CpuBudget | None = None, **options: Any) -> Plan:
    """Parse and validate every option (PlanOptions' fields, values as the command line gives them); raise on
    the first bad one. Writes nothing. `check=False` skips the import check, as `check_import=False` does."""
    o = PlanOptions(**options)
    if o.app is None:
        raise ClusterctlError("no app given", "pass --app MODULE:CALLABLE, e.g. --app myproject.wsgi:application")
    app = parse_app(o.app)
    name = parse_name(o.name) if o.name is not None else default_name(app)
    n, budget = parse_workers(o.workers, budget)
    addresses = tuple(parse_listen(v) for v in o.listen) or (Listen("tcp", host="127.0.0.1", port=DEFAULT_PORT),)
    if len({a.unit_value for a in addresses}) != len(addresses):
        raise ClusterctlError("--listen names the same address twice", "list each address once")
    if o.balance not in ("shared", "reuseport"):
        raise ClusterctlError(f"--balance {o.balance!r} is not shared or reuseport", "see README: Layouts")
    unix = [a.path for a in addresses if a.kind == "unix"]
    if o.balance == "reuseport" and unix:
        raise ClusterctlError(f"--balance reuseport with --listen unix:{unix[0]}: the kernel does not spread unix "
                              "socket connections across SO_REUSEPORT sockets, so one worker would get them all",
                              "use --balance shared (the default) for a unix socket, or listen on a TCP address")
    if not 1 <= o.backlog <= 65535:
        raise ClusterctlError(f"--backlog {o.backlog} is out of range", "use 1-65535 (the kernel caps it at net.core.somaxconn)")
    if not 1 <= o.drain_timeout <= 3600:
        raise ClusterctlError(f"--drain-timeout {o.drain_timeout} is out of range", "use 1-3600 seconds")
    if not 0 <= o.watchdog_sec <= 3600:
        raise ClusterctlError(f"--watchdog-sec {o.watchdog_sec} is out of range", "use 0 (off) to 3600 seconds")
    bad_timeout = timeout_problem(o.timeout)
    if bad_timeout:
        raise ClusterctlError(*bad_timeout)
    if o.interface not in ("auto", "wsgi", "asgi"):
        raise ClusterctlError(f"--interface {o.interface!r} is not auto, wsgi or asgi", "leave it at auto to detect it")
    bad = ws_problem(o.ws_max_size, o.ws_ping_interval, o.ws_ping_timeout)
    if bad:
        raise ClusterctlError(*bad)
    extra = parse_worker_args(o.worker_args)
    task, every = parse_task(o.task, o.every)
    check_memory(parse_size(o.memory_high, "--memory-high"), parse_size(o.memory_max, "--memory-max"))
    py = resolve_python(o.python)
    wd = resolve_working_dir(o.working_dir)
    rw = parse_rw_paths(o.rw_path)
    needed = [("--python", py), ("--python", os.path.realpath(py)), ("--working-dir", wd),
              ("--working-dir", os.path.realpath(wd)), *(("--rw-path", p) for p in rw)]
    home = _protect_home(o.protect_home, o.harden, needed)
    bind_ro = tmp_binds([p for opt, p in needed if opt != "--rw-path"]) if o.harden else ()
    warnings = []
    if o.harden and o.user is None:
        if not readable_by_anyone(py):
            raise ClusterctlError(
                f"--python {os.path.realpath(py)} is not readable by other users, so the workers' dynamic user (the "
                "default without --user) could not run it (203/EXEC)",
                "use a venv made from a world-readable python such as /usr/bin/python3 (not one under /root), or "
                "pass --user with an account that can read it")
        if not readable_by_anyone(wd):
            warnings.append(
                f"--working-dir {os.path.realpath(wd)} is not readable by other users, so a worker with a dynamic "
                "user (the default without --user) will fail to start: install the app under a world-readable path "
                "(e.g. /opt or /srv), or pass --user with an account that can read it (--user root gives up that "
                "isolation)")
    if o.harden and under(wd, rw) is None:
        for db in sqlite_databases(wd):
            who = "--user OWNER (an account that may write it) and " if o.user is None else ""
            warnings.append(f"{db} is an SQLite database, which the workers may read but not write (ProtectSystem=strict"
                            f"{', a dynamic user' if o.user is None else ''}): its writes (Django's login and sessions) "
                            f"will fail with 'readonly database'; pass {who}--rw-path {wd} (SQLite writes a journal "
                            "beside it), or use a database server")
    if o.drain_timeout < o.timeout:
        warnings.append(f"--drain-timeout {o.drain_timeout} is shorter than --timeout {o.timeout}: a deploy or stop cuts "
                        f"requests the timeout still allows; raise --drain-timeout to {o.timeout} if they must finish")
    ws = (o.ws_max_size, o.ws_per_message_deflate, o.ws_ping_interval, o.ws_ping_timeout)
    if o.interface == "wsgi" and ws != (WS_MAX_SIZE, WS_DEFLATE, WS_PING_INTERVAL, WS_PING_TIMEOUT):
        warnings.append("the --ws-* options apply to ASGI apps only: with --interface wsgi the workers ignore them")
    plan = Plan(
        name=name, app=app, workers=n, listen=addresses, balance=o.balance,  # type: ignore[arg-type]
        python=py, working_dir=wd, user=parse_user(o.user), env=parse_env(o.env),
        memory_max=parse_size(o.memory_max, "--memory-max"), memory_high=parse_size(o.memory_high, "--memory-high"),
        cpu_quota=parse_percent(o.cpu_quota, "--cpu-quota"), tasks_max=parse_tasks(o.tasks_max),
        harden=o.harden, rw_paths=rw, protect_home=home, allow_wx=o.allow_wx, bind_ro=bind_ro,  # type: ignore[arg-type]
        backlog=o.backlog, drain_timeout=o.drain_timeout, watchdog_sec=o.watchdog_sec, timeout=o.timeout, task=task,
        every=every,
        interface=o.interface, ws_max_size=o.ws_max_size, ws_per_message_deflate=o.ws_per_message_deflate,
        ws_ping_interval=float(o.ws_ping_interval), ws_ping_timeout=float(o.ws_ping_timeout), worker_args=extra,
        cpu_budget=budget,
        warnings=tuple(warnings),
    )
    if check and o.check_import:
        check_import(plan.app, plan.python, plan.working_dir)
        if plan.task:
            check_import(plan.task, plan.python, plan.working_dir, "--task")
    return plan
