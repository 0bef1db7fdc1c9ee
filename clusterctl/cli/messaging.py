"""`clusterctl broadcast NAME JSON` and `clusterctl send NAME I JSON`: messages from the primary's side
(you, a script, or the periodic task) to the workers, through clusterctl.control.delivery."""

from __future__ import annotations

import click

from clusterctl.cli import cli
from clusterctl.cli.ops import target_options
from clusterctl.control import delivery, ops
from clusterctl.control.registry import locate


@cli.command()
@click.argument("name")
@click.argument("message", metavar="JSON")
@target_options
def broadcast(name: str, message: str, sandbox: str | None, user_manager: bool) -> None:
    """Send a JSON object to every worker of NAME and keep it as their state.

    Each top-level key lands in `worker.state` of every worker, now and in workers that start later
    (saved in /run/NAME/state.json); `worker.on_message` handlers get the object. Instances not running
    get it when they start.
    """
    msg = delivery.parse_message(message)
    click.echo(delivery.broadcast(locate(ops.check_name(name), sandbox, user_manager, doing="broadcast to"), name, msg))


@cli.command()
@click.argument("name")
@click.argument("instance")
@click.argument("message", metavar="JSON")
@target_options
def send(name: str, instance: str, message: str, sandbox: str | None, user_manager: bool) -> None:
    """Send a JSON object to worker INSTANCE of NAME only (its `worker.on_message` handlers; not saved)."""
    msg = delivery.parse_message(message)
    click.echo(delivery.send(locate(ops.check_name(name), sandbox, user_manager, doing="send to"), name, instance, msg))
