"""`up` again on a running cluster: compare what is installed with the new plan and apply the difference
the least disruptive way, or refuse before touching anything.

The comparison is against what is installed in the manager's unit dir (the plan file and the units), not
the last generated output, so a `clusterctl scale` since the last `up` is seen (scale rewrites the installed
plan). Comments (the header naming the generate command) never count as a change.

| what differs | how it is applied |
|---|---|
| worker count (the installed plan's) | scale: start the new instances, or drain and stop the surplus |
| the worker unit (code, arguments, environment, limits) | rolling reload, as `clusterctl reload` |
| the socket (listen addresses, backlog, layout) | needs the socket closed and opened again: only with --force |
| the periodic task | its timer restarted |
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

from clusterctl import generate as gen
from clusterctl import ops
from clusterctl.errors import ClusterctlError
from clusterctl.plan import Plan
from clusterctl.systemd import Systemd


@dataclass(frozen=True)
class Change:
    """What a new plan changes in an installed cluster."""

    old_workers: int
    new_workers: int
    old_listen: tuple[str, ...]
    socket: bool
    service: bool
    task: bool
    diff: str

    @property
    def nothing(self) -> bool:
        return not (self.socket or self.service or self.task) and self.old_workers == self.new_workers

    def summary(self, plan: Plan) -> list[str]:
        out = []
        if self.old_workers != self.new_workers:
            out.append(f"workers {self.old_workers} -> {self.new_workers} (scale)")
        if self.service:
            out.append("worker unit changed (rolling reload)")
        if self.task:
            out.append("periodic task changed (timer restarted)")
        if self.socket:
            new = ", ".join(a.unit_value for a in plan.listen)
            out.append(f"socket changed: listen {', '.join(self.old_listen) or '?'} -> {new}, "
                       f"{plan.balance} layout (the socket is closed and opened again)")
        return out


def _meaning(text: str) -> list[str]:
    """The lines that matter: no comments, Description= or TimeoutStartSec= (which follow the worker count)."""
    return [ln for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith(("#", ";"))
            and not ln.startswith(("Description=", "TimeoutStartSec="))]


def compare(sd: Systemd, plan: Plan) -> Change | None:
    """The change from the installed cluster to `plan`; None if not installed.

    The worker count is compared plan to plan; the units are compared as rendered at the installed count,
    so the target's Wants= (the count) never shows as a unit change. Units an older clusterctl installed
    without a plan file count as a socket change: reinstalled whole, with --force."""
    units = plan.units
    if not ops.is_installed(sd, plan.name):
        return None
    unit_dir = sd.path(sd.unit_dir)
    if not (unit_dir / units.plan_file).is_file():
        return Change(old_workers=plan.workers, new_workers=plan.workers, old_listen=(), socket=True, service=True,
                      task=bool(plan.task), diff=f"{sd.unit_dir}/{units.plan_file}: missing (an older clusterctl "
                      "installed these units): every unit is installed again")
    inst = ops.installed(sd, plan.name)
    files = {k: v for k, v in gen.render(dataclasses.replace(plan, workers=inst.workers)).items()
             if k != units.plan_file}
    old_names = {p.name for p in unit_dir.iterdir() if p.name.startswith(units.prefixes) and p.name != units.plan_file}
    changed: set[str] = set()
    chunks: list[str] = []
    for fname in sorted(old_names | set(files)):
        path = unit_dir / fname
        old = _meaning(path.read_text()) if path.is_file() else []
        new = _meaning(files[fname]) if fname in files else []
        if old != new:
            changed.add(fname)
            chunks += difflib.unified_diff(old, new, f"installed/{fname}", f"new/{fname}", lineterm="")
    return Change(
        old_workers=inst.workers, new_workers=plan.workers, old_listen=inst.listen,
        socket=any(f.endswith(".socket") for f in changed),
        service=units.service() in changed,
        task=bool(changed & {units.task_timer, units.task_service}),
        diff="\n".join(chunks))


def refuse_unless_forced(plan: Plan, change: Change, force: bool) -> None:
    """A socket change closes the listening socket: new connections are refused meanwhile. Ask first."""
    if change.socket and not force:
        raise ClusterctlError(
            f"{plan.name}: the socket changes ({change.summary(plan)[-1]}); that restarts the whole cluster and "
            "refuses connections for a moment, so nothing was changed",
            "run the same `clusterctl up` with --force to do it")


def apply(sd: Systemd, plan: Plan, units: Path, change: Change, *, progress: ops.Progress = print) -> None:
    """Install `units` and bring the running cluster to them, least disruptive way first."""
    name = plan.name
    if change.socket:
        ops.stop_cluster(sd, name, progress=progress)
        ops.install(sd, units, enable=True, progress=lambda m: None)
        ops.start_cluster(sd, name, progress=progress)
        return
    before = ops.installed(sd, name)
    ops.install(sd, units, enable=True, progress=lambda m: None)
    if change.new_workers < change.old_workers:
        ops.resize(sd, before, change.new_workers, progress=progress)
    if change.service:  # over the new count: an instance not running yet starts on the new code
        ops.reload(sd, name, progress=progress)
    elif change.new_workers > change.old_workers:
        ops.resize(sd, before, change.new_workers, progress=progress)
    timer = plan.units.task_timer
    if change.task and (sd.path(sd.unit_dir) / timer).is_file():
        sd.systemctl("restart", timer)
        progress(f"{timer}: restarted")
    ops.start_cluster(sd, name, progress=lambda m: None)
