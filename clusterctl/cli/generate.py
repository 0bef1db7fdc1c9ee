"""`clusterctl generate`: options -> Plan -> rendered, verified unit files."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from clusterctl.cli import cli
from clusterctl.control import config
from clusterctl.control import generate as gen
from clusterctl.control.plan import OptionSpec, Plan, build_plan, default_name, parse_bytes, plan_option_specs
from clusterctl.errors import ClusterctlError


class _Bytes(click.ParamType):
    """A size in bytes, with K, M or G allowed (`16M`)."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        # A ClusterctlError goes up as it is: the CLI prints it as one `Error: ... (fix: ...)` line.
        return parse_bytes(str(value), f"--{param.name.replace('_', '-')}" if param and param.name else "size")


def _click_option(key: str, default: Any, spec: OptionSpec) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one row of the plan options table (plan.PlanOptions)."""
    kw: dict[str, Any] = {"help": spec.help, "metavar": spec.metavar, "show_default": spec.show_default}
    if isinstance(default, tuple):
        kw["multiple"] = True
    elif isinstance(default, bool) and "/" not in spec.flag:
        kw["is_flag"] = True
    else:
        kw["default"] = default
    if spec.choices:
        kw["type"], kw["metavar"] = click.Choice(spec.choices), None
    elif spec.bytes:
        kw["type"] = _Bytes()
    elif type(default) in (int, float):
        kw["type"] = type(default)
    return click.option(spec.flag, key, **kw)


def plan_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that make a Plan, shared by every command that builds one (from plan.PlanOptions)."""
    for key, default, spec in reversed(plan_option_specs()):
        f = _click_option(key, default, spec)(f)
    return f


PLAN_KEYS = tuple(key for key, _, _ in plan_option_specs())


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
    try:
        plan = build_plan(**values)
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
