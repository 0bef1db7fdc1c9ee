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

import contextlib
import dataclasses
import difflib
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from clusterctl.control import forwarder, ops, registry
from clusterctl.control import generate as gen
from clusterctl.control import sandbox as sb
from clusterctl.control.plan import Plan, tmp_binds, under
from clusterctl.control.systemd import Systemd
from clusterctl.errors import ClusterctlError


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


# --- up / down: the whole life of a cluster `up` made ------------------------------------------------

def check_host_port(port: int, sandbox: str) -> None:
    """Fail before anything starts if the host port a sandboxed cluster is forwarded to is taken
    (a forwarder of this same sandbox holding it is fine: `up` replaces it)."""
    if sb.is_running(sandbox) and forwarder.pidfile(sandbox, port).exists():
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ClusterctlError(f"port {port} on the host's loopback is in use ({e.strerror})",
                                  "pass --host-port with a free port, or stop what listens there") from None


def up(plan: Plan, *, use_sandbox: bool | None, sandbox_name: str | None, host_port: int | None,
       output: Path | None, force: bool, progress: ops.Progress = print) -> tuple[Systemd, list[str]]:
    """Generate, install and start `plan` where it ran before (or in a sandbox where systemd is not PID 1),
    or bring the running cluster to it (compare/apply); returns where it runs and the URLs it serves on."""
    name = plan.name
    record = registry.load(name)
    was_sandboxed = record is not None and record.where == "sandbox"
    sandboxed = use_sandbox if use_sandbox is not None else (was_sandboxed if record else not registry.host_has_systemd())
    if not sandboxed and not registry.host_has_systemd():
        raise ClusterctlError("--no-sandbox: systemd is not running as PID 1 on this host, so there is nothing to run "
                              "the cluster in; nothing was written", "leave --no-sandbox out: up then boots a sandbox")
    box = sandbox_name or (record.sandbox if record and was_sandboxed else None) or name
    sd = Systemd(sandbox=box if sandboxed else None)
    running = not sandboxed or sb.is_running(box)
    ports = [(host_port or int(a.port or 0), int(a.port or 0)) for a in plan.listen if a.kind == "tcp"]
    if sandboxed:
        for hp, _ in ports:
            check_host_port(hp, box)
        if running and not sd.path(plan.working_dir).is_dir():
            raise ClusterctlError(f"sandbox {box} was booted without {plan.working_dir}, so its workers cannot see it",
                                  f"take it down first (clusterctl down {name}), then run up again")
    change = compare(sd, plan) if running else None
    if change is not None:
        refuse_unless_forced(plan, change, force)
    out = output if output is not None else registry.units_dir(name)
    result = gen.write(plan, out, force=True)
    progress(f"{out}: {'written' if result.changed else 'up to date'} ({plan.workers} workers, {plan.balance} socket)")
    booted = bool(record and record.booted_sandbox and record.sandbox == box)
    if sandboxed and not running:
        # The app's directory and a /tmp python as they are on the host (read-only), each --rw-path writable.
        needed = [*([] if under(plan.working_dir, plan.rw_paths) else [plan.working_dir]),
                  *tmp_binds([plan.python, os.path.realpath(plan.python)])]
        seconds = sb.up(box, [(p, p, True) for p in dict.fromkeys(needed)] + [(p, p, False) for p in plan.rw_paths])
        booted = True
        progress(f"sandbox {box}: real systemd booted in {seconds:.2f}s (pid {sb.pid(box)})")
    registry.save(registry.Record(name, registry.where_of(sd), sd.sandbox, str(out.resolve()), plan.config,
                                  tuple(hp for hp, _ in ports) if sandboxed else (), booted))
    if change is None:
        ops.install(sd, out, enable=True, start=False, progress=lambda m: None)
        try:
            ops.start_cluster(sd, name, progress=progress)
        except ClusterctlError as e:
            with contextlib.suppress(ClusterctlError):  # nothing left crash-looping; the journal stays for `logs`
                ops.stop_cluster(sd, name, progress=lambda m: None)
            raise ClusterctlError(f"{e.message}\n{name}: its workers are stopped",
                                  f"see why with `clusterctl logs {name} -n 50`, fix it and run up again, or remove "
                                  f"everything with `clusterctl down {name}`") from e
    elif change.nothing:
        ops.install(sd, out, enable=True, progress=lambda m: None)
        ops.start_cluster(sd, name, progress=lambda m: None)
        progress(f"{name}: up to date ({plan.workers} workers)")
    else:
        for line in change.summary(plan):
            progress(f"{name}: {line}")
        if change.diff:
            progress(change.diff)
        apply(sd, plan, out, change, progress=progress)
    urls = []
    for address in plan.listen:
        if sandboxed and address.kind == "tcp":
            port = host_port or int(address.port or 0)
            forwarder.unforward(box, port)
            forwarder.forward(box, port, int(address.port or 0))
            urls.append(f"http://127.0.0.1:{port}/ (forwarded into sandbox {box})")
        else:
            urls.append(address.url)
    for old in set(record.forwards if record and record.sandbox == box else ()) - {hp for hp, _ in ports}:
        forwarder.unforward(box, old)
    return sd, urls


def install(sd: Systemd, source: Path, *, enable: bool, start: bool, progress: ops.Progress = print) -> None:
    """`clusterctl install`: ops.install, and remember where the cluster now runs (keeping what `up` noted)."""
    ops.install(sd, source, enable=enable, start=False, progress=progress)
    name = ops.source_name(source)
    record = registry.load(name)
    registry.save(registry.Record(name, registry.where_of(sd), sd.sandbox, str(source.resolve()),
                                  record.config if record else None, record.forwards if record else (),
                                  bool(record and record.booted_sandbox)))
    if start:
        ops.start_cluster(sd, name, progress=progress)


def down(name: str, sandbox: str | None, user_manager: bool, *, progress: ops.Progress = print) -> None:
    """Stop and uninstall cluster `name` and remove what `up` made for it: its units, forwarders, and the
    sandbox `up` booted for it (when no other cluster runs there)."""
    record = registry.load(name)
    try:
        sd: Systemd | None = registry.locate(name, sandbox, user_manager, doing="take down")
    except ClusterctlError:
        if record is None:
            raise
        sd = None  # its sandbox is gone: only what is left on this side to remove
        progress(f"{name}: {record.describe} is not running; removing what is left here")
    if sd is not None and (record is None or ops.manifest(sd, name).is_file()):
        ops.uninstall(sd, name, progress=progress)
    box = sd.sandbox if sd is not None else (record.sandbox if record else None)
    if box and record is not None:
        for port in record.forwards:
            with contextlib.suppress(ClusterctlError):
                forwarder.unforward(box, port)
    others = [r for r in registry.records() if r.name != name and r.where == "sandbox" and r.sandbox == box]
    if box and not others and ((record is not None and record.booted_sandbox) or (record is None and box == name)):
        sb.down(box, missing_ok=True)
        progress(f"sandbox {box}: down")
    units = registry.units_dir(name)
    if units.is_dir():
        shutil.rmtree(units)
        progress(f"removed {units}")
    registry.forget(name)
