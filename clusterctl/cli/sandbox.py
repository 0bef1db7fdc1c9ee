"""`clusterctl sandbox`: boot, use and stop a real systemd in an isolated namespace sandbox."""

from __future__ import annotations

import os
import sys

import click

from clusterctl.cli import cli
from clusterctl.control import forwarder, sandbox
from clusterctl.errors import ClusterctlError

_PASSTHROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _command(argv: tuple[str, ...]) -> list[str]:
    """click keeps a leading '--' among the passed-through words: drop it."""
    return list(argv[1:] if argv[:1] == ("--",) else argv)


@cli.group("sandbox")
def sandbox_group() -> None:
    """Boot a real systemd as PID 1 of isolated namespaces over an overlay root (needs root).

    The host's files never change: / is an overlay, /tmp and /run are private, kernel knobs are
    read-only and every unit touching kernel-global state is masked. Each sandbox has its own
    loopback-only network; use `netexec` or `forward` to reach it from the host.
    """


@sandbox_group.command("up")
@click.option("--name", "-n", default="default", show_default=True, help="Sandbox name.")
@click.option("--bind", "binds", multiple=True, metavar="SRC[:DST][:ro]", help="Bind a host path inside.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the boot.")
@click.option("--net", type=click.Choice(["private", "host"]), default="private", show_default=True,
              help="private: own loopback-only network; host: share the host's network.")
@click.option("--cgroup", type=click.Choice(["hybrid", "unified"]), default="hybrid", show_default=True,
              help="hybrid mirrors the host's v1 + cgroup2 hierarchies; unified mounts cgroup2 alone.")
@click.option("--unmask", multiple=True, metavar="UNIT", help="Leave UNIT unmasked.")
@click.option("--wants", multiple=True, metavar="UNIT", help="Start UNIT at boot.")
@click.option("--with-dbus", is_flag=True, help="Start dbus (needed by systemd-run and busctl).")
def up_cmd(name: str, binds: tuple[str, ...], timeout: float, net: str, cgroup: str,
           unmask: tuple[str, ...], wants: tuple[str, ...], with_dbus: bool) -> None:
    """Boot sandbox NAME and wait until systemd is running."""
    seconds = sandbox.up(name, binds, net=net, cgroup=cgroup, unmask=unmask,  # type: ignore[arg-type]
                         wants=wants, with_dbus=with_dbus, timeout=timeout)
    click.echo(f"sandbox {name}: up in {seconds:.2f}s (pid {sandbox.pid(name)}, net {net})")


@sandbox_group.command("exec", context_settings=_PASSTHROUGH)
@click.option("--env", "-e", "envs", multiple=True, metavar="VAR=VALUE", help="Set a variable inside.")
@click.option("--no-net", is_flag=True, help="Stay in the host's network namespace.")
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(name: str, envs: tuple[str, ...], no_net: bool, argv: tuple[str, ...]) -> None:
    """Run a command inside sandbox NAME (clean environment); exits with its status."""
    env = dict(e.split("=", 1) if "=" in e else (e, "") for e in envs)
    r = sandbox.exec(name, _command(argv), capture=False, check=False, env=env, net=not no_net)
    sys.exit(r.returncode)


@sandbox_group.command("netexec", context_settings=_PASSTHROUGH)
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def netexec_cmd(name: str, argv: tuple[str, ...]) -> None:
    """Run a HOST command inside only sandbox NAME's network namespace (e.g. wrk, curl)."""
    sys.exit(sandbox.netexec(name, _command(argv), capture=False, check=False).returncode)


@sandbox_group.command("shell")
@click.argument("name")
def shell_cmd(name: str) -> None:
    """An interactive bash inside sandbox NAME."""
    env = {"TERM": os.environ.get("TERM", "dumb"), "PS1": rf"[sandbox {name}] \w# "}
    r = sandbox.exec(name, ["/bin/bash", "--norc", "-i"], capture=False, check=False, env=env)
    sys.exit(r.returncode)


@sandbox_group.command("down")
@click.argument("name")
@click.option("--keep", is_flag=True, help="Keep the state dir (overlay upper layer, logs) for inspection.")
def down_cmd(name: str, keep: bool) -> None:
    """Stop sandbox NAME: kill its PID 1 and remove its cgroups and overlay."""
    sandbox.down(name, keep=keep)
    click.echo(f"sandbox {name}: down")


@sandbox_group.command("ls")
def ls_cmd() -> None:
    """List sandboxes."""
    for info in sandbox.ls():
        state = f"running pid {info.pid}" if info.pid else "stopped"
        boot = f"booted in {info.boot_seconds:.2f}s" if info.boot_seconds else ""
        click.echo(f"{info.name}\t{state}\tnet {info.net}\t{boot}".rstrip())


@sandbox_group.command("forward")
@click.argument("name")
@click.argument("host_port", type=int)
@click.argument("sandbox_port", type=int)
@click.option("--host", default="127.0.0.1", show_default=True, help="Host address to listen on.")
def forward_cmd(name: str, host_port: int, sandbox_port: int, host: str) -> None:
    """Expose sandbox NAME's 127.0.0.1:SANDBOX_PORT on the host's HOST:HOST_PORT (until down)."""
    fpid = forwarder.forward(name, host_port, sandbox_port, host=host)
    click.echo(f"sandbox {name}: {host}:{host_port} -> sandbox 127.0.0.1:{sandbox_port} (pid {fpid})")


@sandbox_group.command("unforward")
@click.argument("name")
@click.argument("host_port", type=int)
def unforward_cmd(name: str, host_port: int) -> None:
    """Stop forwarding HOST_PORT into sandbox NAME."""
    forwarder.unforward(name, host_port)


@sandbox_group.command("log")
@click.argument("name")
def log_cmd(name: str) -> None:
    """Print sandbox NAME's console log (systemd's boot messages)."""
    path = sandbox.state_dir(name) / "console.log"
    if not path.parent.is_dir():
        raise ClusterctlError(f"sandbox {name!r} does not exist", "see the existing ones: clusterctl sandbox ls")
    if not path.exists():
        raise ClusterctlError(f"sandbox {name!r} has no console log ({path} missing)",
                              f"boot it first: clusterctl sandbox up --name {name}")
    click.echo(path.read_text(errors="replace"), nl=False)
