"""`clusterctl broadcast NAME JSON` and `clusterctl send NAME I JSON`: messages from the primary's side
(you, a script, or the periodic task) to the workers, through clusterctl.messaging."""

from __future__ import annotations

import click

from clusterctl import messaging, ops
from clusterctl.cli import cli
from clusterctl.cli.ops import target_options
from clusterctl.errors import ClusterctlError
from clusterctl.registry import locate
from clusterctl.systemd import Systemd


def _message(text: str) -> dict:
    try:
        return messaging.parse(text)
    except messaging.MessageError as e:
        raise ClusterctlError(f"nothing sent: {e}",
                              "pass one JSON object, quoted for the shell, e.g. '{\"usersCount\": 42}'") from None


def _deliver(sd: Systemd, name: str, message: dict, instance: str | None) -> messaging.Delivery:
    sd.check()
    inst = ops.installed(sd, name)
    if instance is not None and not instance.isdigit():  # a number not running is reported by the delivery
        raise ClusterctlError(f"nothing sent: {instance!r} is not an instance number ({name} runs 1-{inst.workers})",
                              f"name one of them, e.g. clusterctl send {name} 1 '{{\"reload\": true}}'")
    directory = messaging.runtime_dir(name, user=sd.user)
    try:
        return messaging.deliver(sd.path(directory), message, instance=instance,
                                 expected=[str(i) for i in inst.instances])
    except FileNotFoundError:
        raise ClusterctlError(f"{name}: no runtime directory {directory} in {sd.where}: no worker has started yet",
                              f"start the cluster first: clusterctl start {name}") from None
    except messaging.MessageError as e:
        raise ClusterctlError(f"nothing sent: {e}", "e.g. clusterctl send NAME 2 '{\"reload\": true}'") from None


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
    msg = _message(message)
    delivery = _deliver(locate(ops.check_name(name), sandbox, user_manager, doing="broadcast to"), name, msg, None)
    if delivery.not_saved:
        raise ClusterctlError(delivery.summary(name), "free space where the runtime directory lives (df -h /run), "
                              "then broadcast again")
    click.echo(delivery.summary(name) + ("; saved as state for workers that start later" if delivery.missed else ""))


@cli.command()
@click.argument("name")
@click.argument("instance")
@click.argument("message", metavar="JSON")
@target_options
def send(name: str, instance: str, message: str, sandbox: str | None, user_manager: bool) -> None:
    """Send a JSON object to worker INSTANCE of NAME only (its `worker.on_message` handlers; not saved)."""
    msg = _message(message)
    delivery = _deliver(locate(ops.check_name(name), sandbox, user_manager, doing="send to"), name, msg, instance)
    if delivery.missed:
        raise ClusterctlError(delivery.summary(name), f"check the instance with: clusterctl status {name}")
    click.echo(delivery.summary(name))
