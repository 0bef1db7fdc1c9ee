"""`clusterctl deploy` (rolling deploy across an Ansible inventory) and the fleet table of `status --inventory`."""

from __future__ import annotations

from pathlib import Path

import click

from clusterctl.cli import cli
from clusterctl.cli.table import INSTANCE_HEAD, instance_cells, print_table, ws_column
from clusterctl.control import config
from clusterctl.control import deploy as dp
from clusterctl.errors import ClusterctlError


@cli.command()
@click.option("--inventory", "-i", type=click.Path(path_type=Path), metavar="INV", help="Ansible inventory of the hosts.")
@click.option("--release", "-r", type=click.Path(path_type=Path), metavar="PATH|WHEEL",
              help="The app: its wheel, or the directory it is imported from (with an optional requirements.txt).")
@click.option("--rollback", is_flag=True, help="Deploy each host's previous release instead.")
@click.option("--serial", default="1", show_default=True, metavar="N|P%", help="Hosts switched at a time.")
@click.option("--health-url", metavar="PATH", help="GET PATH must answer 2xx after each batch of workers and each host.")
@click.option("--check", is_flag=True, help="Show what would change on each host; change nothing.")
@click.option("--name", metavar="NAME", help="Cluster name (default: clusterctl_name from the inventory).")
@click.option("--app", metavar="MODULE:CALLABLE", help="The WSGI app (default: clusterctl_app from the inventory).")
@click.option("--workers", metavar="auto|N", help="Workers per host (default: clusterctl_workers, else auto).")
@click.option("--listen", multiple=True, metavar="ADDR", help="Listen address on each host; repeatable (default 0.0.0.0:8000).")
@click.option("--generate-arg", "generate_args", multiple=True, metavar="ARG",
              help="One more `clusterctl generate` argument for the hosts, e.g. --generate-arg=--memory-max=512M.")
@click.option("--timeout", type=float, metavar="S", help="Seconds a batch of workers may take to be READY (default 60).")
@click.option("--wheels", type=click.Path(path_type=Path), metavar="DIR",
              help="Prebuilt wheels of clusterctl and its dependencies for the hosts (default: pip wheel here).")
@click.option("--ansible-dir", "show_dir", is_flag=True, help="Print where the playbooks are and exit.")
def deploy(inventory: Path | None, release: Path | None, rollback: bool, serial: str, health_url: str | None, check: bool,
           name: str | None, app: str | None, workers: str | None, listen: tuple[str, ...],
           generate_args: tuple[str, ...], timeout: float | None, wheels: Path | None, show_dir: bool) -> None:
    """Rolling deploy across hosts with Ansible: each host in turn gets the release beside the old ones, its
    units and a lossless rolling reload; the first host that fails stops the deploy and is moved back."""
    if show_dir:
        click.echo(dp.ansible_dir())
        return
    if inventory is None:
        raise ClusterctlError("deploy needs --inventory", "e.g. clusterctl deploy --inventory hosts.ini --release dist/app.whl")
    name, app, workers, listen, generate_args = _from_file(name, app, workers, listen, generate_args)
    result = dp.deploy(inventory, release=release, rollback=rollback, name=name, app=app, workers=workers,
                       listen=listen, generate_args=generate_args, serial=serial, health_url=health_url,
                       timeout=timeout, check=check, wheels=wheels, progress=click.echo)
    if check:
        click.echo(f"check: {len(result.hosts)} host(s), nothing changed")
        return
    switched = [h.host for h in result.hosts if h.switched]
    click.echo(f"deployed {result.release if not rollback else 'the previous release'} to {len(result.hosts)} host(s)"
               f" ({len(switched)} switched, {len(result.hosts) - len(switched)} already on it)")


# Keys of the file that name paths on this machine, not on the hosts.
_LOCAL_ONLY = ("working_dir", "python", "check_import")


def _from_file(name: str | None, app: str | None, workers: str | None, listen: tuple[str, ...],
               generate_args: tuple[str, ...]) -> tuple[str | None, str | None, str | None, tuple[str, ...], tuple[str, ...]]:
    """Without --app, the app of ./clusterctl.toml (the one --name picks): its name, app, workers and listen,
    and its other keys as generate arguments for the hosts; options given here still win."""
    path = config.find()
    if path is None or app:
        return name, app, workers, listen, generate_args
    from clusterctl.cli.generate import generate as generate_command

    options = {str(o.name): o for o in generate_command.params if isinstance(o, click.Option)}
    apps = config.load(path, options.values(), [name] if name else [])
    if len(apps) > 1:
        raise ClusterctlError(f"deploy ships one app, and {path} has {', '.join(a.name for a in apps)}",
                              "pick one with --name")
    values = dict(apps[0].values)
    for key in _LOCAL_ONLY:
        values.pop(key, None)
    file_listen = tuple(values.pop("listen", ()))
    file_workers = values.pop("workers", None)
    args: list[str] = []
    for key, value in values.items():
        if key == "app":
            continue
        flag = options[key].opts[0]
        if isinstance(value, bool):
            off = options[key].secondary_opts
            args += [flag] if value else off[:1]
        elif isinstance(value, tuple):
            args += [f"{flag}={v}" for v in value]
        else:
            args.append(f"{flag}={value}")
    return (name or apps[0].name, str(values["app"]), workers or file_workers, listen or file_listen,
            (*args, *generate_args))


def print_fleet_status(inventory: Path, name: str | None, as_json: bool) -> None:
    """`clusterctl status --inventory INV`: one table of every host's instances, with host and release.
    Exits non-zero (after printing) when a host could not be read."""
    fleet = dp.fleet_status(inventory, name)
    if as_json:
        click.echo(fleet.to_json())
    else:
        ws = ws_column(fleet.instances())
        rows = [[str(r["host"]), str(r["release"] or "-"), *instance_cells(r, ws)] for r in fleet.instances()]
        rows += [[h.host, h.release or "-", "-", "-", h.error, *["-"] * (len(INSTANCE_HEAD) - 3 + len(ws))]
                 for h in fleet.hosts if h.error]
        ok = [h for h in fleet.hosts if not h.error]
        click.echo(f"{fleet.name or name or '?'}: {len(ok)}/{len(fleet.hosts)} hosts answered, "
                   f"{len(fleet.instances())} instances")
        print_table(["host", "release", *INSTANCE_HEAD, *ws], rows, state_col=4)
    bad = [h for h in fleet.hosts if h.error]
    if bad:
        raise ClusterctlError("; ".join(f"{h.error if h.error.startswith(h.host) else f'{h.host}: {h.error}'}" for h in bad))
