"""Messages from the primary's side (you, a script) to a cluster's workers: `clusterctl broadcast` and
`send`, over clusterctl.messaging's transport. The checks and the answers live here; the CLI only
parses its arguments and prints the line this returns."""

from __future__ import annotations

from typing import Any

from clusterctl import messaging
from clusterctl.control import ops
from clusterctl.control.systemd import Systemd
from clusterctl.errors import ClusterctlError


def parse_message(text: str) -> dict[str, Any]:
    """The JSON object to send, or one error saying nothing was sent and what to pass."""
    try:
        return messaging.parse(text)
    except messaging.MessageError as e:
        raise ClusterctlError(f"nothing sent: {e}",
                              "pass one JSON object, quoted for the shell, e.g. '{\"usersCount\": 42}'") from None


def deliver(sd: Systemd, name: str, message: dict[str, Any], instance: str | None) -> messaging.Delivery:
    """Hand `message` to every worker (instance None) or one, through the cluster's runtime directory."""
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


def broadcast(sd: Systemd, name: str, message: dict[str, Any]) -> str:
    """Send to every worker and keep as their state; the line to print, or an error if it was not saved."""
    delivery = deliver(sd, name, message, None)
    if delivery.not_saved:
        raise ClusterctlError(delivery.summary(name), "free space where the runtime directory lives (df -h /run), "
                              "then broadcast again")
    return delivery.summary(name) + ("; saved as state for workers that start later" if delivery.missed else "")


def send(sd: Systemd, name: str, instance: str, message: dict[str, Any]) -> str:
    """Send to one worker (not saved); the line to print, or an error if that worker did not get it."""
    delivery = deliver(sd, name, message, instance)
    if delivery.missed:
        raise ClusterctlError(delivery.summary(name), f"check the instance with: clusterctl status {name}")
    return delivery.summary(name)
