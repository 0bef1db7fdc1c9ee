"""`clusterctl generate`: options -> Plan -> rendered, verified unit files."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from clusterctl import config
from clusterctl import generate as gen
from clusterctl.cli import cli
from clusterctl.errors import ClusterctlError
from clusterctl.plan import (
    BACKLOG,
    DRAIN_TIMEOUT,
    TIMEOUT,
    WATCHDOG_SEC,
    WS_DEFLATE,
    WS_MAX_SIZE,
    WS_PING_INTERVAL,
    WS_PING_TIMEOUT,
    Plan,
    build_plan,
    default_name,
    parse_bytes,
)


class _Bytes(click.ParamType):
    """A size in bytes, with K, M or G allowed (`16M`)."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        # A ClusterctlError goes up as it is: the CLI prints it as one `Error: ... (fix: ...)` line.
        return parse_bytes(str(value), f"--{param.name.replace('_', '-')}" if param and param.name else "size")


_PLAN_OPTIONS = [
    click.option("--app", metavar="MODULE:CALLABLE",
                 help="The WSGI/ASGI app, e.g. myproject.wsgi:application (default: every app of ./clusterctl.toml)."),
    click.option("--name", metavar="NAME", help="Unit name prefix (default: the app module's last part)."),
    click.option("--workers", default="auto", show_default=True, metavar="auto|N",
                 help="Worker instances; auto = usable CPUs (affinity and cgroup quota)."),
    click.option("--listen", multiple=True, metavar="ADDR",
                 help="PORT, IPv4:PORT, [IPv6]:PORT or unix:/path; repeatable (default 127.0.0.1:8000)."),
    click.option("--balance", type=click.Choice(["shared", "reuseport"]), default="shared", show_default=True,
                 help="shared: one socket, one queue; reuseport: a socket per worker, kernel-hashed."),
    click.option("--user", metavar="USER", help="Run the workers as this user (default: a DynamicUser= per worker)."),
    click.option("--working-dir", metavar="DIR", help="Directory the app is imported from (default: cwd)."),
    click.option("--python", metavar="PATH", help="Interpreter with the app and clusterctl installed (default: this one)."),
    click.option("--env", multiple=True, metavar="KEY=VALUE", help="Environment for the workers; repeatable."),
    click.option("--memory-max", metavar="SIZE", help="Hard memory limit per worker (MemoryMax=), e.g. 512M."),
    click.option("--memory-high", metavar="SIZE", help="Soft memory limit per worker, reclaimed above (MemoryHigh=)."),
    click.option("--cpu-quota", metavar="PCT", help="CPU limit per worker (CPUQuota=), e.g. 150%."),
    click.option("--tasks-max", metavar="N", help="Most threads and processes per worker (TasksMax=), e.g. 64."),
    click.option("--harden/--no-harden", default=True, show_default=True,
                 help="Sandbox the workers (ProtectSystem=strict, no capabilities, syscall filter; see README: Hardening)."),
    click.option("--rw-path", multiple=True, metavar="DIR",
                 help="A directory the workers may write (ReadWritePaths=); everything else is read-only. Repeatable."),
    click.option("--protect-home", type=click.Choice(["no", "read-only", "tmpfs", "yes"]), default=None,
                 help="ProtectHome= (default: yes, or read-only when the app or python lives under /home or /root)."),
    click.option("--allow-wx", is_flag=True,
                 help="Drop MemoryDenyWriteExecute= for libraries that need W+X memory (cffi ABI-mode ffi.callback(), JITs)."),
    click.option("--backlog", type=int, default=BACKLOG, show_default=True, help="Listen queue length (Backlog=)."),
    click.option("--drain-timeout", type=int, default=DRAIN_TIMEOUT, show_default=True,
                 help="Seconds a stopping worker may finish in-flight requests."),
    click.option("--watchdog-sec", type=int, default=WATCHDOG_SEC, show_default=True,
                 help="Restart a worker whose event loop is blocked this long outside a request's app code (0: off)."),
    click.option("--timeout", type=int, default=TIMEOUT, show_default=True, metavar="SECONDS",
                 help="Replace a worker whose request has run app code this long (named in the journal; gunicorn's --timeout)."),
    click.option("--interface", type=click.Choice(["auto", "wsgi", "asgi"]), default="auto", show_default=True,
                 help="The app's interface: auto detects WSGI, ASGI 3 or ASGI 2 when the worker imports it."),
    click.option("--ws-max-size", type=_Bytes(), default=WS_MAX_SIZE, show_default=True, metavar="BYTES",
                 help="ASGI WebSockets: largest message (bytes; K, M, G allowed); a larger one closes with 1009."),
    click.option("--ws-per-message-deflate/--no-ws-per-message-deflate", default=WS_DEFLATE, show_default=True,
                 help="ASGI WebSockets: accept permessage-deflate compression when the client offers it."),
    click.option("--ws-ping-interval", type=float, default=WS_PING_INTERVAL, show_default=True, metavar="SECONDS",
                 help="ASGI WebSockets: send a keepalive ping this often (0: no pings)."),
    click.option("--ws-ping-timeout", type=float, default=WS_PING_TIMEOUT, show_default=True, metavar="SECONDS",
                 help="ASGI WebSockets: close with 1011 when nothing came back this long after a ping."),
    click.option("--worker-args", multiple=True, metavar="'OPTIONS'",
                 help="More worker options for ExecStart=, checked by the worker's parser, e.g. "
                      "--worker-args '--threads 8 --max-requests 1000 --keepalive-timeout 75'; repeatable."),
    click.option("--every", metavar="SPAN",
                 help="Run --task this often (a systemd time span: 10s, 5min); NAME-task.timer + NAME-task.service."),
    click.option("--task", metavar="MODULE:FUNC",
                 help="Periodic primary task: FUNC's returned JSON object is broadcast to every worker (worker.state)."),
    click.option("--check-import/--no-check-import", default=True, show_default=True,
                 help="Import the app (and --task) with the target python before writing anything."),
]


def plan_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that make a Plan, shared by every command that builds one."""
    for option in reversed(_PLAN_OPTIONS):
        f = option(f)
    return f


PLAN_KEYS = ("app", "name", "workers", "listen", "balance", "user", "working_dir", "python", "env",
             "memory_max", "memory_high", "cpu_quota", "tasks_max", "harden", "rw_path", "protect_home", "allow_wx",
             "backlog", "drain_timeout", "watchdog_sec", "timeout", "interface", "ws_max_size", "ws_per_message_deflate",
             "ws_ping_interval", "ws_ping_timeout", "worker_args", "every", "task", "check_import")


def plans_from_options(options: dict[str, Any]) -> list[Plan]:
    """The Plans the plan options ask for; pops them so the caller keeps only its own.

    With --app alone: that one app. With a clusterctl.toml (or [tool.clusterctl]) in the current
    directory: every app in it, or the one --name (or --app's default name) names, each with the options
    given on the command line laid over its table."""
    ctx = click.get_current_context()
    given = {k: options.pop(k) for k in PLAN_KEYS}
    explicit = {k for k in PLAN_KEYS if ctx.get_parameter_source(k) in
                (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
    path = config.find()
    name = given["name"] or (default_name(given["app"]) if given["app"] else None)
    if path is None or (given["app"] and name not in config.app_names(path)):
        if not given["app"]:
            raise ClusterctlError(f"{ctx.info_name} needs --app MODULE:CALLABLE, or a {config.FILE} here with "
                                  "[apps.NAME] tables", "e.g. --app myproject.wsgi:application (see README: clusterctl.toml)")
        return [_plan(given, None, set())]
    params = [p for p in ctx.command.params if isinstance(p, click.Option) and p.name in PLAN_KEYS]
    plans = []
    for app in config.load(path, params, [name] if name else []):
        values = {**given, **app.values, **{k: given[k] for k in explicit}, "name": app.name}
        plans.append(_plan(values, app, set(app.values) - explicit))
    return plans


def _plan(values: dict[str, Any], app: config.AppConfig | None, from_file: set[str]) -> Plan:
    kwargs = dict(values)
    check = kwargs.pop("check_import")
    try:
        plan = build_plan(**kwargs, check=check)
    except ClusterctlError as e:
        # name the file when the value that failed came from it ("--memory-max '1' ..." -> its key)
        key = next((k for k in from_file if e.message.startswith(f"--{k.replace('_', '-')} ")), None)
        if app is None or key is None:
            raise
        raise ClusterctlError(f"{app.origin}: {e.message.removeprefix('--')}", e.fix) from None
    if app is not None:
        plan = dataclasses.replace(plan, config=app.origin)
    for warning in plan.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    return plan


def plan_from_options(options: dict[str, Any]) -> Plan:
    """The one Plan of the plan options (commands that handle a single cluster)."""
    plans = plans_from_options(options)
    if len(plans) != 1:
        raise ClusterctlError(f"{config.find()} has {len(plans)} apps: {', '.join(p.name for p in plans)}",
                              "pick one with --name")
    return plans[0]


@cli.command()
@plan_options
@click.option("--output", "-o", type=click.Path(path_type=Path), metavar="DIR", help="Where to write (default: units/NAME).")
@click.option("--diff", "show_diff", is_flag=True, help="Show what would change in an existing output.")
@click.option("--force", is_flag=True, help="Overwrite an existing output that differs.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the units with systemd-analyze verify.")
@click.option("--verbose", "-v", is_flag=True, help="Explain the worker count and the plan.")
def generate(output: Path | None, show_diff: bool, force: bool, verify: bool, verbose: bool, **options: Any) -> None:
    """Render systemd units for a WSGI/ASGI app: a socket, NAME@.service workers and NAME.target.

    Without --app, every app of the clusterctl.toml in this directory (units/NAME each)."""
    plans = plans_from_options(options)
    if output is not None and len(plans) > 1:
        raise ClusterctlError(f"--output names one directory, but {len(plans)} apps are generated",
                              "leave --output out (units/NAME each), or pick one app with --name")
    for plan in plans:
        _generate_one(plan, output if output is not None else Path("units") / plan.name, show_diff=show_diff,
                      force=force, verify=verify, verbose=verbose)


def _generate_one(plan: Plan, out: Path, *, show_diff: bool, force: bool, verify: bool, verbose: bool) -> None:
    if verbose:
        if plan.cpu_budget is not None:
            click.echo(f"workers: {plan.cpu_budget.explain()}")
        else:
            click.echo(f"workers: {plan.workers} (from --workers)")
        click.echo(f"layout: {plan.balance}; listen: {', '.join(a.unit_value for a in plan.listen)}")
        click.echo(f"python: {plan.python}; working dir: {plan.working_dir}")
        if plan.task:
            click.echo(f"task: {plan.task} every {plan.every} (broadcast to every worker)")
    if show_diff:
        diff, _stale = gen.diff_against(out, gen.render(plan), plan.name)
        click.echo(diff or f"{out}: up to date", nl=not diff)
        if not force:
            return
    result = gen.write(plan, out, force=force, check_units=verify)
    if not result.changed:
        click.echo(f"{out}: up to date ({plan.workers} workers)")
        return
    for p in result.written:
        click.echo(f"wrote {p}")
    for p in result.removed:
        click.echo(f"removed {p}")
    click.echo(f"{plan.name}: {plan.workers} workers, {plan.balance} socket on "
               f"{', '.join(a.unit_value for a in plan.listen)}" + (" (verified)" if verify else ""))
