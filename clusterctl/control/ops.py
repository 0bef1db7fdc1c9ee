"""Day-to-day operations on an installed cluster, PM2-style: install, status, rolling reload, scale, logs.

Everything is thin over systemctl and journalctl through a `Systemd` (host, user manager or sandbox).
The plan the units were rendered from (NAME.plan.json, installed beside them) is the source of truth:
operations read the worker count and addresses from it and re-render from it (scale), never parse unit
files; install keeps a manifest of the files it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clusterctl import messaging, probe, proc, statusline
from clusterctl.control import generate as gen
from clusterctl.control import rollout
from clusterctl.control.plan import NAME_RE, Plan, plan_from_json
from clusterctl.control.systemd import Systemd
from clusterctl.control.unitnames import UnitNames
from clusterctl.errors import ClusterctlError, CommandError

Progress = Callable[[str], None]

SERVICE_PROPS = ("Id", "MainPID", "LoadState", "ActiveState", "SubState", "Result", "NRestarts",
                 "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "CPUUsageNSec",
                 "MemoryCurrent", "StatusText", "ExecMainStatus")
SOCKET_PROPS = ("Id", "ActiveState", "SubState", "Listen", "NAccepted", "NConnections")


# --- what is installed ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Installed:
    """An installed cluster: the plan its units were rendered from (NAME.plan.json beside them)."""

    plan: Plan
    unit_dir: str

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def workers(self) -> int:
        return self.plan.workers

    @property
    def balance(self) -> str:
        return self.plan.balance

    @property
    def listen(self) -> tuple[str, ...]:
        """ListenStream= values of the socket unit(s)."""
        return tuple(a.unit_value for a in self.plan.listen)

    @property
    def units(self) -> UnitNames:
        return self.plan.units

    @property
    def instances(self) -> list[int]:
        return self.plan.instances

    def service(self, i: int | str) -> str:
        return self.units.service(i)

    def socket(self, i: int) -> str:
        return self.units.socket(i)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ClusterctlError(f"{name!r} is not a valid cluster name", "use the --name given to generate, e.g. hello")
    return name


def is_installed(sd: Systemd, name: str) -> bool:
    """Whether cluster `name` has units in the manager's unit dir (its target)."""
    return (sd.path(sd.unit_dir) / UnitNames(name).target).is_file()


def require_installed(sd: Systemd, name: str) -> UnitNames:
    """The cluster's unit names, or an error saying it is not installed there (its target missing)."""
    units = UnitNames(check_name(name))
    if not is_installed(sd, name):
        raise ClusterctlError(f"cluster {name!r} is not installed in {sd.where} ({sd.unit_dir}/{units.target} missing)",
                              f"install it first: clusterctl install units/{name}")
    return units


def installed(sd: Systemd, name: str) -> Installed:
    """The installed cluster's plan, read from the file install put beside its units, or say why there is none.

    Units installed by a clusterctl that did not keep the plan (before NAME.plan.json) are not read back
    from their text: the error names the one step that writes the plan (`up` again, or generate + install)."""
    units = require_installed(sd, name)
    path = sd.path(sd.unit_dir) / units.plan_file
    if not path.is_file():
        raise ClusterctlError(
            f"cluster {name!r} was installed by an older clusterctl that did not keep its plan ({sd.unit_dir}/"
            f"{units.plan_file} missing)", f"install its units again: `clusterctl up` with its options (add --force), "
            f"or `clusterctl generate ... --force` and `clusterctl install units/{name}`")
    return Installed(plan_from_json(path.read_text(), f"{sd.unit_dir}/{units.plan_file}"), sd.unit_dir)


# --- install / uninstall ---------------------------------------------------------------------------

def manifest(sd: Systemd, name: str) -> Path:
    """The install manifest: the files install wrote (uninstall removes exactly those)."""
    return sd.path(sd.state_dir) / f"{name}.json"


def source_name(source: Path) -> str:
    """The cluster name of a directory of generated units (its one NAME.target)."""
    if not source.is_dir():
        raise ClusterctlError(f"{source} is not a directory of generated units", "run clusterctl generate first")
    targets = sorted(source.glob("*.target"))
    if len(targets) != 1:
        raise ClusterctlError(f"{source} should hold exactly one NAME.target, found {len(targets)}",
                              "point install at one output directory of clusterctl generate")
    return check_name(targets[0].name.removesuffix(".target"))


def install(sd: Systemd, source: Path, *, enable: bool = False, start: bool = False,
            progress: Progress = print) -> list[str]:
    """Copy a generated unit directory into the manager's unit dir, daemon-reload, enable/start the target."""
    name = source_name(source)
    units = UnitNames(name)
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.startswith(units.prefixes))
    sd.require_root()
    sd.check()
    unit_dir = sd.path(sd.unit_dir)
    unit_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        dest = unit_dir / f.name
        if f.name == units.service():  # in-place reload: remember what only a restart applies
            rollout.note_install(sd, name, dest.read_text() if dest.is_file() else None, f.read_text())
        tmp = dest.with_name(f".{f.name}.tmp")
        tmp.write_text(f.read_text())
        tmp.replace(dest)
        written.append(f"{sd.unit_dir}/{f.name}")
    manifest_path = manifest(sd, name)
    # files an earlier install wrote that this one does not (a task dropped, the other socket layout): gone
    previous = json.loads(manifest_path.read_text()).get("files", []) if manifest_path.is_file() else []
    stale = [f for f in previous if f not in written]
    if stale:  # a template's instances by glob (NAME-listen@*.socket)
        sd.systemctl("stop", *(Path(f).name.replace("@.", "@*.") for f in stale), check=False)
    for f in stale:
        sd.path(f).unlink(missing_ok=True)
        progress(f"removed {f}")
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps({"name": name, "files": written, "unit_dir": sd.unit_dir}, indent=2) + "\n")
    for w in written:
        progress(f"installed {w}")
    sd.systemctl("daemon-reload")
    if enable:
        sd.systemctl("enable", units.target)
        progress(f"enabled {units.target} (starts at boot)")
    if start:
        start_cluster(sd, name, progress=progress)
    return written


def uninstall(sd: Systemd, name: str, *, progress: Progress = print) -> None:
    """Stop the cluster and remove exactly the files install wrote."""
    check_name(name)
    sd.require_root()
    sd.check()
    manifest_path = manifest(sd, name)
    if not manifest_path.is_file():
        raise ClusterctlError(f"cluster {name!r} was not installed by clusterctl in {sd.where} (no {sd.state_dir}/{name}.json)",
                              "check the name with `systemctl list-units '*.target'`")
    files = json.loads(manifest_path.read_text())["files"]
    sd.systemctl("disable", "--now", UnitNames(name).target, check=False)
    units = _loaded_units(sd, name)
    if units:
        sd.systemctl("stop", *units, check=False)
    # messaging: RuntimeDirectoryPreserve=yes keeps /run/NAME (sockets, state.json) past stop; uninstall clears it
    messaging.remove_runtime_dir(sd.path(messaging.runtime_dir(name, user=sd.user)))
    for f in files:
        sd.path(f).unlink(missing_ok=True)
        progress(f"removed {f}")
    manifest_path.unlink()
    rollout.forget(sd, name)
    sd.systemctl("daemon-reload")
    if units:
        sd.systemctl("reset-failed", *units, check=False)


# --- start / stop -----------------------------------------------------------------------------------

def start_cluster(sd: Systemd, name: str, *, timeout: float = 120, progress: Progress = print) -> None:
    """Start the target; with Type=notify the start job finishes only once every instance is READY."""
    inst = installed(sd, name)
    t0 = time.monotonic()
    try:
        sd.systemctl("start", inst.units.target, *[inst.service(i) for i in inst.instances], timeout=timeout)
    except CommandError as e:
        raise ClusterctlError(f"{name}: not every instance came up:\n{_failing(sd, inst) or e.message}",
                              f"see the worker's log: clusterctl logs {name} -n 50") from e
    progress(f"{name}: {inst.workers}/{inst.workers} instances READY in {time.monotonic() - t0:.2f}s")


def stop_cluster(sd: Systemd, name: str, *, progress: Progress = print) -> None:
    """Stop the target, every instance (each drains first) and the socket(s)."""
    units = require_installed(sd, name)  # no plan needed: stopping works on units of any clusterctl
    sd.systemctl("stop", *dict.fromkeys([units.target, *_loaded_units(sd, name)]))
    progress(f"{name}: stopped")


def restart_cluster(sd: Systemd, name: str, *, progress: Progress = print) -> None:
    """Restart every worker at once: lossless (the socket stays open), each READY before it counts."""
    inst = installed(sd, name)
    t0 = time.monotonic()
    sd.systemctl("restart", *[inst.service(i) for i in inst.instances])
    progress(f"{name}: {inst.workers} workers restarted and READY in {time.monotonic() - t0:.2f}s")


def _loaded_units(sd: Systemd, name: str) -> list[str]:
    """Every unit of the cluster systemd has loaded (workers, sockets, target, the periodic task)."""
    return list(dict.fromkeys(u for pattern in UnitNames(name).globs for u in sd.list_units(pattern)))


def _failing(sd: Systemd, inst: Installed) -> str:
    rows = sd.show([inst.service(i) for i in inst.instances], ("Id", "ActiveState", "SubState", "Result"))
    bad = [r for r in rows if r.get("ActiveState") != "active"]
    lines = [f"  {r['Id']}: {r.get('ActiveState')}/{r.get('SubState')} ({r.get('Result')})" for r in bad]
    for r in bad[:1]:
        tail = sd.journalctl("-u", r["Id"], "-n", "8", "-o", "cat").strip()
        lines += [f"  | {line}" for line in tail.splitlines()]
    return "\n".join(lines)


# --- status ------------------------------------------------------------------------------------------

@dataclass
class InstanceStatus:
    instance: str
    unit: str
    pid: int
    state: str
    sub_state: str
    uptime_s: float | None
    restarts: int
    cpu_s: float | None
    cpu_pct: float | None
    memory_bytes: int | None
    requests: int | None
    in_flight: int | None
    errors: int | None
    status_text: str
    configured: bool
    # Why an instance is not active/running: systemd's Result= and its last journal line ("" when fine).
    why: str = ""
    # Open WebSockets (ASGI workers report them in STATUS=; None for WSGI workers).
    websockets: int | None = None
    # In-place reloads (`systemctl reload`, which NRestarts does not count): how many, and the last one's time.
    reloads: int = 0
    last_reload: float | None = None
    # The HTTP engine the worker serves with ("compiled" or "python", from STATUS=; None before it says).
    engine: str | None = None


@dataclass
class ClusterStatus:
    name: str
    where: str
    workers: int
    balance: str
    listen: list[str]
    socket_state: str
    instances: list[InstanceStatus] = field(default_factory=list)
    # messaging: the periodic task's timer and last run ("" when the cluster has no --task)
    task: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_prometheus(self) -> str:
        """The Prometheus text exposition format (for node_exporter's textfile collector, or a scrape
        through any HTTP server): one series per worker and metric, labelled cluster and instance;
        a value systemd or the worker did not report is left out, not written as 0."""
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        out: list[str] = []
        cluster = f'cluster="{esc(self.name)}"'
        out += ["# HELP clusterctl_workers Worker instances the cluster is configured with.",
                "# TYPE clusterctl_workers gauge", f"clusterctl_workers{{{cluster}}} {self.workers}"]
        for metric, kind, text, get in _PROM_METRICS:
            rows = [(i.instance, get(i)) for i in self.instances]
            rows = [(inst, v) for inst, v in rows if v is not None]
            if not rows:
                continue
            out += [f"# HELP clusterctl_worker_{metric} {text}", f"# TYPE clusterctl_worker_{metric} {kind}"]
            out += [f'clusterctl_worker_{metric}{{{cluster},instance="{esc(inst)}"}} '
                    f'{v if isinstance(v, int) else repr(float(v))}' for inst, v in rows]
        return "\n".join(out) + "\n"


# (metric, type, help, value of an InstanceStatus or None)
_PROM_METRICS: list[tuple[str, str, str, Callable[[InstanceStatus], float | None]]] = [
    ("up", "gauge", "1 when the worker's unit is active and running.",
     lambda i: float(i.state == "active" and i.sub_state == "running")),
    ("restarts_total", "counter", "Times systemd restarted the worker (NRestarts=).", lambda i: i.restarts),
    ("uptime_seconds", "gauge", "Seconds since the worker's unit became active.", lambda i: i.uptime_s),
    ("cpu_seconds_total", "counter", "CPU time of the worker's cgroup (CPUUsageNSec=).", lambda i: i.cpu_s),
    ("memory_bytes", "gauge", "Memory of the worker's cgroup (MemoryCurrent=).", lambda i: i.memory_bytes),
    ("requests_total", "counter", "Requests the worker served (its STATUS= line).", lambda i: i.requests),
    ("requests_in_flight", "gauge", "Requests in progress in the worker.", lambda i: i.in_flight),
    ("errors_total", "counter", "Requests that ended in an app error (500).", lambda i: i.errors),
    ("websockets", "gauge", "Open WebSockets (ASGI workers).", lambda i: i.websockets),
    ("reloads_total", "counter", "In-place reloads of the worker (systemctl reload; not restarts).", lambda i: i.reloads),
    ("last_reload_timestamp_seconds", "gauge", "Unix time of the worker's last in-place reload.",
     lambda i: i.last_reload),
]


def _int(value: str | None) -> int | None:
    try:
        v = int(value or "")
    except ValueError:
        return None
    return None if v >= 2**63 - 1 or v < 0 else v  # systemd's "[not set]" is UINT64_MAX


def _cpu_ticks(sd: Systemd, pid: int) -> float | None:
    """CPU seconds of a process from /proc/PID/stat (CPUUsageNSec is unset under a hybrid cgroup tree)."""
    try:
        stat = sd.path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def status(sd: Systemd, name: str, *, sample: float = 0.25) -> ClusterStatus:
    """One row per instance from systemd's own accounting, plus the runtime's STATUS= counters."""
    sd.check()
    inst = installed(sd, name)
    units = sorted(set(sd.list_units(inst.units.service("*"))) | {inst.service(i) for i in inst.instances},
                   key=lambda u: (len(u), u))
    rows = sd.show(units, SERVICE_PROPS)
    sockets = sd.show(sorted({inst.socket(i) for i in inst.instances}), SOCKET_PROPS)
    socket_state = ", ".join(f"{s.get('Id')} {s.get('ActiveState')}/{s.get('SubState')}" for s in sockets)
    now = time.monotonic()
    cpu0 = {r["Id"]: _cpu_ticks(sd, int(r.get("MainPID") or 0)) for r in rows if int(r.get("MainPID") or 0)}
    if sample and cpu0:
        time.sleep(sample)
    out = ClusterStatus(name, sd.where, inst.workers, inst.balance, list(inst.listen), socket_state)
    reloads = rollout.reload_counts(sd, messaging.runtime_dir(name, user=sd.user))
    for r in rows:
        pid = int(r.get("MainPID") or 0)
        started = _int(r.get("ExecMainStartTimestampMonotonic"))
        uptime = (now - started / 1e6) if started and pid else None
        cpu_ns = _int(r.get("CPUUsageNSec"))
        cpu_s = cpu_ns / 1e9 if cpu_ns is not None else cpu0.get(r["Id"])
        pct = None
        if pid and cpu0.get(r["Id"]) is not None and sample:
            later = _cpu_ticks(sd, pid)
            if later is not None:
                pct = round(100.0 * (later - cpu0[r["Id"]]) / sample, 1)  # type: ignore[operator]
        mem = _int(r.get("MemoryCurrent"))
        if mem is None and pid:
            try:
                m = re.search(r"VmRSS:\s+(\d+) kB", sd.path(f"/proc/{pid}/status").read_text())
                mem = int(m.group(1)) * 1024 if m else None
            except OSError:
                mem = None
        text = r.get("StatusText", "")
        counters = statusline.parse(text)
        instance = inst.units.instance_of(r["Id"])
        why = ""
        if (r.get("ActiveState"), r.get("SubState")) != ("active", "running") and r.get("LoadState") == "loaded":
            tail = sd.journalctl("-u", r["Id"], "-n", "20", "-o", "cat").strip().splitlines()
            # the worker's own last words, not systemd's lines about the unit around them
            errors = [ln for ln in tail if not ln.startswith(("Starting ", "Started ", "Stopping ", "Stopped ",
                                                               "Failed to start ", r["Id"] + ": "))]
            last = errors[-1] if errors else (tail[-1] if tail else "no log")
            result = r.get("Result", "success")  # back to "success" while a restart is starting
            why = last if result == "success" else f"{result}: {last}"
        out.instances.append(InstanceStatus(
            instance=instance, unit=r["Id"], pid=pid, state=r.get("ActiveState", "?"), sub_state=r.get("SubState", "?"),
            uptime_s=round(uptime, 1) if uptime is not None else None, restarts=_int(r.get("NRestarts")) or 0,
            cpu_s=round(cpu_s, 2) if cpu_s is not None else None, cpu_pct=pct, memory_bytes=mem,
            requests=counters.get("served"), in_flight=counters.get("in_flight"), errors=counters.get("errors"),
            status_text=text,
            configured=instance.isdigit() and int(instance) in inst.instances, why=why,
            websockets=counters.get("websockets"), engine=counters.get("engine"),  # type: ignore[arg-type]
            reloads=int(reloads.get(instance, {}).get("count", 0)),
            last_reload=reloads.get(instance, {}).get("last")))
    out.task = _task_status(sd, name)
    return out


def _task_status(sd: Systemd, name: str) -> str:
    """messaging: one line about NAME-task.timer and its service's last run, or "" without a task."""
    units = UnitNames(name)
    if not (sd.path(sd.unit_dir) / units.task_timer).is_file():
        return ""
    timer, service = sd.show([units.task_timer, units.task_service],
                             ("Id", "ActiveState", "SubState", "LastTriggerUSec", "Result"))
    last = timer.get("LastTriggerUSec") or ""
    return (f"{timer.get('Id')} {timer.get('ActiveState')}/{timer.get('SubState')}; last run "
            + (f"{last} ({service.get('Result')})" if last and last != "n/a" else "never"))


# --- readiness and health -----------------------------------------------------------------------------

def _main_pid(sd: Systemd, unit: str) -> int:
    row = sd.show([unit], ("MainPID",))
    return int(row[0].get("MainPID") or 0) if row else 0


def health_check(sd: Systemd, inst: Installed, path: str, timeout: float = 5.0) -> tuple[bool, str]:
    """GET path through the cluster's socket (the way clients come in); 2xx is healthy."""
    address = inst.plan.listen[0]  # a plan always has one
    try:
        with sd.connect(address, timeout=timeout) as s:
            s.sendall(probe.request(path))
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return False, f"{address.unit_value}: {e}"
    text = probe.answer(data)
    return probe.healthy(text), text


def _wait_health(sd: Systemd, inst: Installed, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        ok, last = health_check(sd, inst, path)
        if ok:
            return
        time.sleep(0.2)
    raise ClusterctlError(f"health check GET {path} did not answer 2xx within {timeout:g}s (last: {last})", "")


# --- rolling reload ------------------------------------------------------------------------------------

def batch_size(spec: str, workers: int) -> int:
    m = re.fullmatch(r"(\d+)(%?)", spec.strip())
    if not m or int(m.group(1)) == 0:
        raise ClusterctlError(f"--batch {spec!r} is not a positive count or percentage", "e.g. --batch 1 or --batch 25%")
    n = int(m.group(1))
    size = math.ceil(workers * n / 100) if m.group(2) else n
    return max(1, min(size, workers))


def _restart(sd: Systemd, units: list[str], timeout: float) -> None:
    sd.systemctl("restart", *units, timeout=timeout)


def reload(sd: Systemd, name: str, *, batch: str = "1", pause: float = 0.0, health_url: str | None = None,
           timeout: float = 60.0, surge: bool = True, how: str = "auto", progress: Progress = print) -> None:
    """Rolling deploy, in place (`systemctl reload`, see clusterctl.control.rollout) where the installed units and
    what changed allow it, else by restarting instances batch by batch, each READY (and healthy) first.

    With the shared socket a surge instance NAME@N+1 starts first on the new code: if it does not come
    up, it is stopped and every instance is left untouched on the old code. Each `systemctl restart` of
    a Type=notify unit returns only after the new process sent READY=1; the first batch that fails stops
    the reload, leaving the instances after it on the old code. With reuseport sockets each batch's own
    socket units are stopped first, so their workers' queues leave the kernel's group while they restart.
    """
    sd.check()
    inst = installed(sd, name)
    size = batch_size(batch, inst.workers)
    if health_url is not None and not health_url.startswith("/"):
        raise ClusterctlError(f"--health-url {health_url!r} must be a path", "e.g. --health-url /health")
    units = [inst.service(i) for i in inst.instances]
    states = {r["Id"]: r.get("ActiveState", "") for r in sd.show(units, ("Id", "ActiveState"))}
    mechanism, why = rollout.choose(sd, name, sd.path(inst.unit_dir).joinpath(inst.units.service()).read_text(),
                                    states, how=how, batch=batch, pause=pause)
    progress(f"{name}: {'in-place reload (systemctl reload)' if mechanism == 'reload' else 'rolling restart'}: {why}")
    if mechanism == "reload":
        rollout.reload_in_place(sd, name, units, progress=progress)
        if health_url:
            _wait_health(sd, inst, health_url, timeout)
        return
    _rolling_restart(sd, inst, size=size, pause=pause, health_url=health_url, timeout=timeout, surge=surge,
                     progress=progress)
    rollout.forget(sd, name)


def _rolling_restart(sd: Systemd, inst: Installed, *, size: int, pause: float, health_url: str | None,
                     timeout: float, surge: bool, progress: Progress) -> None:
    name = inst.name
    t0 = time.monotonic()
    spare = inst.service(inst.workers + 1)
    use_surge = surge and inst.balance == "shared"
    if use_surge:
        try:
            sd.systemctl("start", spare, timeout=timeout)
            if health_url:
                _wait_health(sd, inst, health_url, timeout)
        except (CommandError, ClusterctlError) as e:
            why = _unit_failure(sd, spare)
            sd.systemctl("stop", spare, check=False)
            sd.systemctl("reset-failed", spare, check=False)
            raise ClusterctlError(
                f"{name}: the new code did not come up in {spare}: {why or e.message}; all {inst.workers} instances "
                "still run the old code", f"fix the release, then reload again (clusterctl logs {name} --instance "
                f"{inst.workers + 1})") from e
        progress(f"{spare}: new code READY (surge instance, pid {_main_pid(sd, spare)})")
    try:
        done = 0
        for k in range(0, inst.workers, size):
            group = inst.instances[k:k + size]
            units = [inst.service(i) for i in group]
            before = {u: _main_pid(sd, u) for u in units}
            t1 = time.monotonic()
            try:
                if inst.balance == "reuseport" and size < inst.workers:
                    # As in scale-down: close systemd's copy of the batch's own sockets first (the workers keep
                    # theirs and accept on). When a worker exits, its socket leaves the SO_REUSEPORT group, so
                    # new connections go to the other workers' sockets instead of waiting for the restart (and
                    # what was queued on it moves over with net.ipv4.tcp_migrate_req=1); the restart's start
                    # job opens a fresh socket through Requires=.
                    sd.systemctl("stop", "--job-mode=ignore-dependencies", *(inst.socket(i) for i in group),
                                 timeout=timeout)
                _restart(sd, units, timeout)
                if health_url:
                    _wait_health(sd, inst, health_url, timeout)
            except (CommandError, ClusterctlError) as e:
                failed = [u for u in units if _unit_failure(sd, u)]
                rest = inst.instances[k + size:]
                raise ClusterctlError(
                    f"{name}: {', '.join(failed or units)} did not come up: "
                    f"{_unit_failure(sd, (failed or units)[0]) or e.message}; {done} instance(s) run the new code"
                    + (f", {', '.join(map(str, rest))} still run the old code" if rest else ""),
                    f"fix the release and run `clusterctl reload {name}` again; see `clusterctl logs {name}`") from e
            for u in units:
                progress(f"{u}: pid {before[u]} -> {_main_pid(sd, u)}, READY in {time.monotonic() - t1:.2f}s")
            done += len(units)
            if pause and done < inst.workers:
                time.sleep(pause)
    finally:
        if use_surge:
            sd.systemctl("stop", spare, check=False)
    progress(f"{name}: {inst.workers}/{inst.workers} instances on the new code in {time.monotonic() - t0:.2f}s")


def _unit_failure(sd: Systemd, unit: str) -> str:
    rows = sd.show([unit], ("ActiveState", "SubState", "Result"))
    if not rows or rows[0].get("ActiveState") == "active":
        return ""
    r = rows[0]
    tail = sd.journalctl("-u", unit, "-n", "3", "-o", "cat").strip().splitlines()
    return f"{r.get('ActiveState')}/{r.get('SubState')} ({r.get('Result')})" + (f": {tail[-1]}" if tail else "")


# --- scale ---------------------------------------------------------------------------------------------

def parse_scale(spec: str, current: int) -> int:
    m = re.fullmatch(r"([+-]?)(\d+)", spec.strip())
    if not m:
        raise ClusterctlError(f"scale {spec!r} is not N, +K or -K", "e.g. clusterctl scale hello 4, or +1, or -1")
    n = int(m.group(2))
    new = current + n if m.group(1) == "+" else current - n if m.group(1) == "-" else n
    if not 1 <= new <= 1024:
        raise ClusterctlError(f"scale {spec} would leave {new} workers", "keep between 1 and 1024 workers")
    return new


def _install_count(sd: Systemd, plan: Plan, workers: int) -> None:
    """Re-render the target (its Wants= are the worker count systemd starts at boot) and the plan file for
    `workers`, and put both in place of the installed ones; the other units do not depend on the count."""
    scaled = dataclasses.replace(plan, workers=workers)
    files = gen.render(scaled)
    unit_dir = sd.path(sd.unit_dir)
    for fname in (scaled.units.target, scaled.units.plan_file):
        tmp = unit_dir / f".{fname}.tmp"
        tmp.write_text(files[fname])
        tmp.replace(unit_dir / fname)


def scale(sd: Systemd, name: str, spec: str, *, timeout: float = 120, progress: Progress = print) -> int:
    """Change the worker count now and for the next boot (the target's Wants=); scaling down drains."""
    sd.require_root()
    sd.check()
    inst = installed(sd, name)
    new = parse_scale(spec, inst.workers)
    if new == inst.workers:
        progress(f"{name}: already {new} workers")
        return new
    _install_count(sd, inst.plan, new)
    sd.systemctl("daemon-reload")
    resize(sd, inst, new, timeout=timeout, progress=progress)
    return new


def resize(sd: Systemd, inst: Installed, new: int, *, timeout: float = 120, progress: Progress = print) -> None:
    """Start or drain-and-stop instances to go from `inst` (as it ran) to `new` workers, once the target on
    disk already says `new`; a start that fails puts the target back to the old count."""
    name = inst.name
    if new > inst.workers:
        units = [inst.service(i) for i in range(inst.workers + 1, new + 1)]
        try:
            sd.systemctl("start", *units, timeout=timeout)
        except CommandError as e:
            _install_count(sd, inst.plan, inst.workers)
            sd.systemctl("daemon-reload")
            sd.systemctl("stop", *units, check=False)
            raise ClusterctlError(f"{name}: new instances did not come up: {_unit_failure(sd, units[0]) or e.message}; "
                                  f"kept {inst.workers} workers", f"see clusterctl logs {name}") from e
        progress(f"{name}: started {', '.join(units)} (READY)")
    elif new < inst.workers:
        units = [inst.service(i) for i in range(new + 1, inst.workers + 1)]
        if inst.balance == "reuseport":
            # Close systemd's copy of each leaving worker's socket first, leaving the worker running (it still
            # holds the socket and accepts). Stopped after the worker instead, systemd would accept-and-close
            # ("flush") every connection the kernel queues on it meanwhile, and those clients get a reset.
            sockets = [inst.socket(i) for i in range(new + 1, inst.workers + 1)]
            sd.systemctl("stop", "--job-mode=ignore-dependencies", *sockets, timeout=timeout)
        # SIGTERM: each drains its in-flight requests, and its listener's last close hands the connections
        # still queued on it to the other workers when net.ipv4.tcp_migrate_req=1 (see README, Layouts).
        sd.systemctl("stop", *units, timeout=timeout)
        progress(f"{name}: drained and stopped {', '.join(units)}")
    progress(f"{name}: {new} workers (was {inst.workers})")


# --- logs -------------------------------------------------------------------------------------------------

LOG_FIELDS = ("METHOD", "PATH", "STATUS", "DURATION_MS", "BYTES", "INSTANCE")


def logs(sd: Systemd, name: str, *, follow: bool = False, lines: int | None = 50, instance: str | None = None,
         since: str | None = None, as_json: bool = False) -> Iterator[str]:
    """Journal lines of every instance, merged in time order, each prefixed by its instance."""
    inst = installed(sd, name)
    if lines is not None and lines < 0:
        raise ClusterctlError(f"--lines {lines} is negative", "e.g. -n 50, or -n 0 with -f for new lines only")
    if instance is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", instance):
        raise ClusterctlError(f"--instance {instance!r} is not an instance name", "e.g. --instance 2")
    if instance is not None and instance not in map(str, inst.instances) and not sd.journalctl(
            "-q", "-n", "1", "-o", "cat", "-u", inst.service(instance)).strip():
        raise ClusterctlError(f"{name} has no instance {instance} (it runs {inst.workers}) and none ever logged",
                              f"pick one of 1-{inst.workers}, see clusterctl status {name}")
    if since:
        r = proc.run(sd.journalctl_argv("-q", "-n", "0", "--since", since), check=False, timeout=60)
        if r.returncode != 0:
            raise ClusterctlError(f"--since {since!r} is not a time journalctl understands",
                                  "e.g. --since '10 min ago', --since today, --since '2026-11-30 12:00:00'")
    pattern = inst.units.service(instance or "*")
    args = ["-u", pattern, "-o", "json", "--output-fields=" + ",".join(
        ("MESSAGE", "_SYSTEMD_UNIT", "UNIT", "__REALTIME_TIMESTAMP", "_PID", "PRIORITY", *LOG_FIELDS))]
    if lines is not None:
        args += ["-n", str(lines)]
    if since:
        args += ["--since", since]
    if follow:
        source: Iterator[str] = sd.follow(*args, "-f")
    else:
        source = iter(sd.journalctl(*args).splitlines())
    for raw in source:
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            continue
        unit = entry.get("_SYSTEMD_UNIT") or ""
        msg = entry.get("MESSAGE")
        if isinstance(msg, list):  # binary-safe form of a message with control characters
            msg = bytes(msg).decode("utf-8", "replace")
        if not unit.startswith(f"{name}@") and entry.get("UNIT"):  # systemd's own line about the unit
            unit, msg = entry["UNIT"], f"systemd: {msg}"
        inst_id = inst.units.instance_of(unit) or "?"
        ts = int(entry.get("__REALTIME_TIMESTAMP", 0)) / 1e6
        if as_json:
            record = {"instance": inst_id, "unit": unit, "time": ts, "pid": entry.get("_PID"), "message": msg}
            record.update({k.lower(): entry[k] for k in LOG_FIELDS if k in entry})
            yield json.dumps(record)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
            yield f"{inst_id:>3}|{name} {stamp} {msg}"
