"""Operations: up/down, install/uninstall, start/stop/restart, status, reload, scale, logs."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from clusterctl import generate as gen
from clusterctl import ops
from clusterctl import sandbox as sb
from clusterctl.cli import cli
from clusterctl.cli.generate import plan_from_options, plan_options
from clusterctl.cli.table import INSTANCE_HEAD, instance_cells, print_table, ws_column
from clusterctl.errors import ClusterctlError
from clusterctl.systemd import Systemd


def target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--sandbox / --user: which systemd manager an operation talks to."""
    f = click.option("--user", "user_manager", is_flag=True, help="Use your user manager (systemctl --user).")(f)
    return click.option("--sandbox", metavar="S", envvar="CLUSTERCTL_SANDBOX",
                        help="Operate inside clusterctl sandbox S (env CLUSTERCTL_SANDBOX).")(f)


def _sd(sandbox: str | None, user_manager: bool) -> Systemd:
    if sandbox and user_manager:
        raise ClusterctlError("--sandbox and --user exclude each other", "pick one")
    return Systemd(sandbox=sandbox, user=user_manager)


# --- up / down ---------------------------------------------------------------------------------------

def _systemd_is_pid1() -> bool:
    return os.path.isdir("/run/systemd/system")


def _check_host_port(port: int, sandbox: str) -> None:
    """Fail before anything starts if the host port a sandboxed cluster is forwarded to is taken
    (a forwarder of this same sandbox holding it is fine: `up` replaces it)."""
    if sb.is_running(sandbox) and (sb.state_dir(sandbox) / f"forward-{port}.pid").exists():
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ClusterctlError(f"port {port} on the host's loopback is in use ({e.strerror})",
                                  "pass --host-port with a free port, or stop what listens there") from None


@cli.command()
@plan_options
@click.option("--sandbox/--no-sandbox", "use_sandbox", default=None,
              help="Run in a clusterctl sandbox (default: only when systemd is not PID 1 here).")
@click.option("--sandbox-name", metavar="S", help="Sandbox name (default: the cluster name).")
@click.option("--host-port", type=int, metavar="PORT", help="Host loopback port for a sandboxed cluster (default: same).")
@click.option("--output", "-o", type=click.Path(path_type=Path), metavar="DIR",
              help="Where to write the units (default: ~/.local/state/clusterctl/units/NAME).")
def up(use_sandbox: bool | None, sandbox_name: str | None, host_port: int | None, output: Path | None,
       **options: Any) -> None:
    """Generate, install and start a cluster, wait for every worker READY, print the URL and status.

    Where systemd is not PID 1 (containers, CI) the cluster runs in a clusterctl sandbox, a real systemd
    in isolated namespaces, and its port is forwarded to the host's loopback.
    """
    plan = plan_from_options(options)
    sandboxed = use_sandbox if use_sandbox is not None else not _systemd_is_pid1()
    name = sandbox_name or plan.name
    if sandboxed:
        for address in plan.listen:
            if address.kind == "tcp":
                _check_host_port(host_port or int(address.port or 0), name)
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state")
    out = output if output is not None else state / "clusterctl/units" / plan.name
    result = gen.write(plan, out, force=True)
    click.echo(f"{out}: {'written' if result.changed else 'up to date'} ({plan.workers} workers, {plan.balance} socket)")
    if sandboxed:
        if sb.is_running(name):
            click.echo(f"sandbox {name}: already running, reusing it")
        else:
            seconds = sb.up(name, [(plan.working_dir, plan.working_dir, True)])
            click.echo(f"sandbox {name}: real systemd booted in {seconds:.2f}s (pid {sb.pid(name)})")
    sd = Systemd(sandbox=name if sandboxed else None)
    ops.install(sd, out, enable=True, start=False, progress=lambda m: None)
    ops.start_cluster(sd, plan.name, progress=click.echo)
    urls = []
    for address in plan.listen:
        if sandboxed and address.kind == "tcp":
            port = host_port or int(address.port or 0)
            sb.unforward(name, port)
            sb.forward(name, port, int(address.port or 0))
            urls.append(f"http://127.0.0.1:{port}/ (forwarded into sandbox {name})")
        else:
            urls.append(address.url)
    for url in urls:
        click.echo(f"serving {plan.app} on {url}")
    _print_status(ops.status(sd, plan.name))
    hint = f" --sandbox {name}" if sandboxed else ""
    click.echo(f"next: clusterctl status {plan.name}{hint} | clusterctl reload {plan.name}{hint} | "
               f"clusterctl logs {plan.name}{hint} | clusterctl down {plan.name}")


@cli.command()
@click.argument("name")
@target_options
def down(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Stop and uninstall cluster NAME; if `up` put it in sandbox NAME, stop that sandbox too."""
    ops.check_name(name)
    if not sandbox and not user_manager and not _systemd_is_pid1() and sb.is_running(name):
        sandbox = name
    sd = _sd(sandbox, user_manager)
    ops.uninstall(sd, name, progress=click.echo)
    if sandbox == name:
        sb.down(name, missing_ok=True)
        click.echo(f"sandbox {name}: down")


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
    ops.install(_sd(sandbox, user_manager), source, enable=enable, start=start, progress=click.echo)


@cli.command()
@click.argument("name")
@target_options
def uninstall(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Stop cluster NAME and remove exactly the files install wrote."""
    ops.uninstall(_sd(sandbox, user_manager), name, progress=click.echo)


@cli.command()
@click.argument("name")
@target_options
def start(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Start cluster NAME and wait until every worker is READY."""
    sd = _sd(sandbox, user_manager)
    sd.check()
    ops.start_cluster(sd, name, progress=click.echo)


@cli.command()
@click.argument("name")
@target_options
def stop(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Stop cluster NAME: workers drain in-flight requests, then the socket closes."""
    sd = _sd(sandbox, user_manager)
    sd.check()
    ops.stop_cluster(sd, name, progress=click.echo)


@cli.command()
@click.argument("name")
@target_options
def restart(name: str, sandbox: str | None, user_manager: bool) -> None:
    """Restart every worker at once (lossless: the socket stays open). Prefer `reload` for deploys."""
    sd = _sd(sandbox, user_manager)
    sd.check()
    inst = ops.installed(sd, name)
    t0 = time.monotonic()
    sd.systemctl("restart", *[inst.service(i) for i in inst.instances])
    click.echo(f"{name}: {inst.workers} workers restarted and READY in {time.monotonic() - t0:.2f}s")


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
    # --- fleet: the whole inventory, through clusterctl.deploy (NAME defaults to the inventory's) ---
    if inventory is not None:
        from clusterctl.cli.deploy import print_fleet_status

        print_fleet_status(inventory, name, as_json)
        return
    if name is None:
        raise ClusterctlError("status needs NAME (or --inventory INV)", "e.g. clusterctl status hello")
    sd = _sd(sandbox, user_manager)
    while True:
        st = ops.status(sd, name)
        if prometheus:
            click.echo(st.to_prometheus(), nl=False)
        elif as_json:
            click.echo(st.to_json())
        else:
            if watch:
                click.clear()
            _print_status(st)
        if not watch:
            return
        time.sleep(2)


# --- reload / scale -----------------------------------------------------------------------------------

@cli.command()
@click.argument("name")
@click.option("--batch", default="1", show_default=True, metavar="N|P%", help="Instances restarted at a time.")
@click.option("--pause", default=0.0, show_default=True, metavar="S", help="Seconds to wait between batches.")
@click.option("--health-url", metavar="PATH", help="Also wait for GET PATH to answer 2xx through the socket.")
@click.option("--timeout", default=60.0, show_default=True, metavar="S", help="Seconds a batch may take to be READY.")
@click.option("--no-surge", is_flag=True, help="Do not start a spare instance on the new code first.")
@click.option("--how", type=click.Choice(["auto", "reload", "restart"]), default="auto", show_default=True,
              help="reload: in place (systemctl reload, no instance stops serving); restart: restart instances "
                   "(applies every unit setting); auto: reload unless what `install` changed needs a restart.")
@target_options
def reload(name: str, batch: str, pause: float, health_url: str | None, timeout: float, no_surge: bool, how: str,
           sandbox: str | None, user_manager: bool) -> None:
    """Rolling deploy, one worker at a time, each serving before the next; stops on the first failure.

    Says which way it went: in place (`systemctl reload`) or by restarts (--batch, --pause, --no-surge)."""
    ops.reload(_sd(sandbox, user_manager), name, batch=batch, pause=pause, health_url=health_url,
               timeout=timeout, surge=not no_surge, how=how, progress=click.echo)


@cli.command()
@click.argument("name")
@click.argument("count", metavar="N|+K|-K")
@target_options
def scale(name: str, count: str, sandbox: str | None, user_manager: bool) -> None:
    """Set the worker count now and for the next boot; scaling down drains before stopping."""
    ops.scale(_sd(sandbox, user_manager), name, count, progress=click.echo)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--lines", "-n", default=50, show_default=True, help="Lines of history.")
@click.option("--instance", "-i", metavar="I", help="Only this instance.")
@click.option("--since", metavar="TIME", help="journalctl --since (e.g. '10 min ago').")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, with the structured fields.")
@target_options
def logs(name: str, follow: bool, lines: int, instance: str | None, since: str | None, as_json: bool,
         sandbox: str | None, user_manager: bool) -> None:
    """Every worker's journal, merged in time order and prefixed with its instance, like `pm2 logs`."""
    try:
        for line in ops.logs(_sd(sandbox, user_manager), name, follow=follow, lines=lines, instance=instance,
                             since=since, as_json=as_json):
            click.echo(line)
    except KeyboardInterrupt:
        pass

