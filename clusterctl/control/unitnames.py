"""The names of a cluster's systemd units and files, derived in this one place (stdlib only).

generate renders files under these names, install copies them, and every operation (status, scale,
reload, uninstall) addresses the units by them: a name changed here changes everywhere at once.
"""

from __future__ import annotations

from dataclasses import dataclass

Instance = int | str | None


@dataclass(frozen=True)
class UnitNames:
    """Unit and file names of cluster `name` with socket layout `balance` (shared or reuseport)."""

    name: str
    balance: str = "shared"

    @property
    def target(self) -> str:
        return f"{self.name}.target"

    def service(self, instance: Instance = None) -> str:
        """A worker's service, or with no instance the template file (`NAME@.service`)."""
        return f"{self.name}@{'' if instance is None else instance}.service"

    def socket(self, instance: Instance = None) -> str:
        """The socket unit of the cluster, or of one instance (`%i` in templates; None: the template file).

        Per-instance sockets are named NAME-listen@I.socket, not NAME@I.socket, so that
        `systemctl restart 'NAME@*'` restarts the workers and never the sockets (a socket restart drops the
        connections queued on it)."""
        if self.balance == "shared":
            return f"{self.name}.socket"
        return f"{self.name}-listen@{'' if instance is None else instance}.socket"

    @property
    def task_timer(self) -> str:
        return f"{self.name}-task.timer"

    @property
    def task_service(self) -> str:
        return f"{self.name}-task.service"

    @property
    def plan_file(self) -> str:
        """The plan the units were rendered from, beside them (generate writes it, install copies it)."""
        return f"{self.name}.plan.json"

    @property
    def prefixes(self) -> tuple[str, ...]:
        """How the names of the cluster's files begin (the periodic task's included), whatever the layout."""
        return (f"{self.name}.", f"{self.name}@.", f"{self.name}-listen@.", f"{self.name}-task.")

    @property
    def globs(self) -> tuple[str, ...]:
        """Patterns (for `systemctl list-units`) that match every unit of the cluster, loaded instances included."""
        return (f"{self.name}@*", f"{self.name}.*", f"{self.name}-listen@*.socket", f"{self.name}-task.*")

    def instance_of(self, unit: str) -> str:
        """`NAME@3.service` -> `3`."""
        return unit.removeprefix(f"{self.name}@").removesuffix(".service")
