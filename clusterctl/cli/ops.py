"""Operations: up/down, install/uninstall, start/stop/restart, status, reload, scale, logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from clusterctl.cli import cli
from clusterctl.cli.generate import plan_options, plans_from_options
from clusterctl.cli.table import INSTANCE_HEAD, instance_cells, print_table, ws_column
from clusterctl.control import config, converge, ops, registry
from clusterctl.control.plan import Plan
from clusterctl.control.systemd import Systemd
from clusterctl.errors import ClusterctlError


def target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--sandbox / --user: which systemd manager an operation talks to."""
    f = click.option("--user", "user_manager", is_flag=True, help="Use your user manager (systemctl --user).")(f)
    return click.option("--sandbox", metavar="S", envvar="CLUSTERCTL_SANDBOX",
                        help="Operate inside clusterctl sandbox S (env CLUSTERCTL_SANDBOX).")(f)


def _sd(sandbox: str | None, user_manager: bool) -> Systemd:
    if sandbox and user_manager:
        raise ClusterctlError("--sandbox and --user exclude each other", "pick one")
    return Systemd(sandbox=sandbox, user=user_manager)


def _checked(name: str, sandbox: str | None, user_manager: bool, doing: str) -> Systemd:
    """Where cluster NAME runs (registry.locate), its manager answering."""
    sd = registry.locate(name, sandbox, user_manager, doing=doing)
    sd.check()
    return sd


def names_here(name: str | None, command: str) -> list[str]:
    """NAME, or with none given every app of the clusterctl.toml in this directory."""
    if name:
        return [ops.check_name(name)]
    path = config.find()
    if path is None:
        raise ClusterctlError(f"{command} needs NAME (or a {config.FILE} here listing the apps)",
                              f"e.g. clusterctl {command} hello")
    return config.app_names(path)


# --- up / down ---------------------------------------------------------------------------------------

@cli.command()
@plan_options
@click.option("--sandbox/--no-sandbox", "use_sandbox", default=None,
              help="Run in a clusterctl sandbox (default: where it ran before, else only when systemd is not PID 1).")
@click.option("--sandbox-name", metavar="S", help="Sandbox name (default: the cluster name).")
@click.option("--host-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Host loopback port for a sandboxed cluster (default: same).")
@click.option("--output", "-o", type=click.Path(path_type=Path), metavar="DIR",
              help="Where to write the units (default: ~/.local/state/clusterctl/units/NAME).")
@click.option("--force", is_flag=True, help="Apply a change that needs the socket restarted (listen address, layout).")
def up(use_sandbox: bool | None, sandbox_name: str | None, host_port: int | None, output: Path | None, force: bool,
       **options: Any) -> None:
    """Generate, install and start a cluster, wait for every worker READY, print the URL and status.

    Without --app, every app of the clusterctl.toml in this directory. Run again with other options, it
    shows the difference and applies it: a worker count by scaling, a code or option change by a rolling
    reload; a listen address change restarts the socket, so it asks for --force.

    Where systemd is not PID 1 (containers, CI) the cluster runs in a clusterctl sandbox, a real systemd
    in isolated namespaces, and its port is forwarded to the host's loopback. Later commands find the
    cluster by NAME alone.
    """
    plans = plans_from_options(options)
    if len(plans) > 1 and (output is not None or host_port is not None or sandbox_name):
        raise ClusterctlError(f"--output, --host-port and --sandbox-name are for one app, and {len(plans)} were named",
                              "pick one app with --name")
    for plan in plans:
        _up_one(plan, use_sandbox, sandbox_name, host_port, output, force)


def _up_one(plan: Plan, use_sandbox: bool | None, sandbox_name: str | None, host_port: int | None,
            output: Path | None, force: bool) -> None:
    sd, urls = converge.up(plan, use_sandbox=use_sandbox, sandbox_name=sandbox_name, host_port=host_port,
                           output=output, force=force, progress=click.echo)
    for url in urls:
        click.echo(f"serving {plan.app} on {url}")
    _print_status(ops.status(sd, plan.name))
    name = plan.name
    click.echo(f"next: clusterctl status {name} | clusterctl reload {name} | clusterctl logs {name} | "
               f"clusterctl down {name}")


@cli.command()
@click.argument("name", required=False)
@target_options
def down(name: str | None, sandbox: str | None, user_manager: bool) -> None:
    """Stop and uninstall cluster NAME and remove what `up` made for it (its units, its sandbox).

    Without NAME, every app of the clusterctl.toml in this directory."""
    for n in names_here(name, "down"):
        converge.down(n, sandbox, user_manager, progress=click.echo)


# --- install ------------------------------------------------------------------------------------------

@cli.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--name", metavar="NAME", help="Install units/NAME.")
@click.option("--enable", is_flag=True, help="Start the cluster at boot (enable NAME.target).")
@click.option("--start", is_flag=True, help="Start it now and wait until every worker is READY.")
@target_options
def install(directory: Path | None, name: str | None, enable: bool, start: bool, sandbox: str | None,
            user_manager: bool) -> None:
    """Copy generated units into systemd's unit directory and daemon-reload."""
    if directory is None and name is None:
        raise ClusterctlError("install needs a directory of units or --name", "e.g. clusterctl install units/hello")
    source = directory if directory is not None else Path("units") / ops.check_name(name or "")
    converge.install(_sd(sandbox, user_manager), source, enable=enable, start=start, progress=click.echo)


@cli.command()
@click.argument("name")
@target_options
def uninstall(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Stop cluster NAME and remove exactly the files install wrote."""
    ops.uninstall(registry.locate(name, sandbox, user_manager, doing="uninstall"), name, progress=click.echo)
    registry.forget(name)


@cli.command()
@click.argument("name")
@target_options
def start(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Start cluster NAME and wait until every worker is READY."""
    ops.start_cluster(_checked(name, sandbox, user_manager, "start"), name, progress=click.echo)


@cli.command()
@click.argument("name")
@target_options
def stop(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Stop cluster NAME: workers drain in-flight requests, then the socket closes."""
    ops.stop_cluster(_checked(name, sandbox, user_manager, "stop"), name, progress=click.echo)


@cli.command()
@click.argument("name")
@target_options
def restart(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Restart every worker at once (lossless: the socket stays open). Prefer `reload` for deploys."""
    ops.restart_cluster(_checked(name, sandbox, user_manager, "restart"), name, progress=click.echo)


# --- status -------------------------------------------------------------------------------------------

def _print_status(st: ops.ClusterStatus) -> None:
    click.echo(f"{st.name}: {st.workers} workers ({st.balance} socket; {st.socket_state}) on "
               f"{', '.join(st.listen)} [{st.where}]")
    rows = [asdict(i) for i in st.instances]
    ws = ws_column(rows)
    print_table([*INSTANCE_HEAD, *ws], [instance_cells(r, ws) for r in rows], state_col=2)
    tty = sys.stdout.isatty()
    for i in st.instances:
        if i.why:
            text = f"instance {i.instance} is {i.state}/{i.sub_state} after {i.restarts} restarts: {i.why}"
            click.echo(click.style(text, fg="red") if tty else text)
    if any(not i.configured for i in st.instances):
        click.echo("* not part of the configured worker count (a surge or leftover instance)")
    if st.task:  # messaging: the periodic task
        click.echo(f"task: {st.task}")


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--prometheus", is_flag=True,
              help="Prometheus text format (e.g. for node_exporter's textfile collector).")
@click.option("--watch", "-w", is_flag=True, help="Refresh every 2 seconds until interrupted.")
@click.option("--inventory", "-i", type=click.Path(path_type=Path), metavar="INV",
              help="Every host of an Ansible inventory, with host and release columns (see clusterctl deploy).")
@target_options
def status(name: str | None, as_json: bool, prometheus: bool, watch: bool, inventory: Path | None,
           sandbox: str | None, user_manager: bool) -> None:
    """One row per worker, like `pm2 ls`: pid, state, uptime, restarts, CPU, memory, requests."""
    if prometheus and (as_json or watch or inventory is not None):
        raise ClusterctlError("--prometheus goes alone", "drop --json/--watch/--inventory; a timer or cron job "
                              "can rewrite a .prom file as often as it likes")
    # --- fleet: the whole inventory, through clusterctl.control.deploy (NAME defaults to the inventory's) ---
    if inventory is not None:
        from clusterctl.cli.deploy import print_fleet_status

        print_fleet_status(inventory, name, as_json)
        return
    names = names_here(name, "status")
    where = {n: registry.locate(n, sandbox, user_manager, doing="show the status of") for n in names}
    while True:
        states = [ops.status(sd, n) for n, sd in where.items()]
        if watch and not (prometheus or as_json):
            click.clear()
        for st in states:
            if prometheus:
                click.echo(st.to_prometheus(), nl=False)
            elif as_json:
                click.echo(st.to_json())
            else:
                _print_status(st)
        if not watch:
            return
        time.sleep(2)


# --- reload / scale -----------------------------------------------------------------------------------

@cli.command()
@click.argument("name", required=False)
@click.option("--batch", default="1", show_default=True, metavar="N|P%", help="Instances restarted at a time.")
@click.option("--pause", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="S",
              help="Seconds to wait between batches.")
@click.option("--health-url", metavar="PATH", help="Also wait for GET PATH to answer 2xx through the socket.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, metavar="S",
              help="Seconds a batch may take to be READY.")
@click.option("--no-surge", is_flag=True, help="Do not start a spare instance on the new code first.")
@click.option("--how", type=click.Choice(["auto", "reload", "restart"]), default="auto", show_default=True,
              help="reload: in place (systemctl reload, no instance stops serving); restart: restart instances "
                   "(applies every unit setting); auto: reload unless what `install` changed needs a restart.")
@target_options
def reload(name: str | None, batch: str, pause: float, health_url: str | None, timeout: float, no_surge: bool, how: str,
           sandbox: str | None, user_manager: bool) -> None:
    """Rolling deploy, one worker at a time, each serving before the next; stops on the first failure.

    Says which way it went: in place (`systemctl reload`) or by restarts (--batch, --pause, --no-surge).
    Without NAME, every app of the clusterctl.toml in this directory, one after the other."""
    where = {n: registry.locate(n, sandbox, user_manager, doing="reload") for n in names_here(name, "reload")}
    for n, sd in where.items():
        ops.reload(sd, n, batch=batch, pause=pause, health_url=health_url, timeout=timeout, surge=not no_surge,
                   how=how, progress=click.echo)


@cli.command()
@click.argument("name")
@click.argument("count", metavar="N|+K|-K")
@target_options
def scale(name: str, count: str, sandbox: str | None, user_manager: bool) -> None:
    """Set the worker count now and for the next boot; scaling down drains before stopping."""
    ops.scale(registry.locate(name, sandbox, user_manager, doing="scale"), name, count, progress=click.echo)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--lines", "-n", type=click.IntRange(min=0), default=50, show_default=True, help="Lines of history.")
@click.option("--instance", "-i", metavar="I", help="Only this instance.")
@click.option("--since", metavar="TIME", help="journalctl --since (e.g. '10 min ago').")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, with the structured fields.")
@target_options
def logs(name: str, follow: bool, lines: int, instance: str | None, since: str | None, as_json: bool,
         sandbox: str | None, user_manager: bool) -> None:
    """Every worker's journal, merged in time order and prefixed with its instance, like `pm2 logs`."""
    sd = registry.locate(name, sandbox, user_manager, doing="show the logs of")
    try:
        for line in ops.logs(sd, name, follow=follow, lines=lines, instance=instance,
                             since=since, as_json=as_json):
            click.echo(line)
    except KeyboardInterrupt:
        pass

