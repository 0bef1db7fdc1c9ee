"""Rolling deploys across a fleet: build a release here, let Ansible switch the hosts batch by batch.

Ansible (ansible-core) moves the release to the hosts and runs `clusterctl` there; each host then does
what clusterctl already does well on one machine (generate, install, a lossless rolling reload). This
module builds the release payload the hosts need without network access (the wheels of clusterctl, its
dependencies and the app, plus an app directory), passes everything to `ansible-playbook` as one JSON
extra-vars file (argument lists only, never a shell string), and reads the playbook's outcome from the
JSON lines of our callback plugin, so each failure becomes one line naming the host and the reason.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clusterctl import proc
from clusterctl.control.plan import NAME_RE, parse_app
from clusterctl.errors import ClusterctlError

Progress = Callable[[str], None]

EVENT_CALLBACK = "clusterctl_events"
SKIP_DIRS = {"__pycache__", ".git", ".venv", ".tox", ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules"}
SERIAL_RE = re.compile(r"^([1-9]\d*)(%?)$")
# task names of the role that the progress output follows
SWITCH_TASK = "clusterctl | switch the current link"
INSTALL_TASK = "clusterctl | install the release's units"
RELOAD_TASK = "clusterctl | rolling reload onto the release"


def ansible_dir() -> Path:
    """The playbooks and role: packaged beside the module in a wheel, at the repo root in a checkout."""
    package = Path(__file__).resolve().parent.parent  # clusterctl/
    for candidate in (package / "ansible", package.parent / "ansible"):
        if (candidate / "deploy.yml").is_file():
            return candidate
    raise ClusterctlError("clusterctl's Ansible playbooks are missing", "reinstall clusterctl")


def ansible_tool(tool: str = "ansible-playbook") -> str:
    """An Ansible program from this interpreter's environment first (the `fleet` extra installs it there)."""
    beside = Path(sys.executable).parent / tool
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return proc.which(tool, fix="install Ansible: pip install 'clusterctl[fleet]' (ansible-core)")


def ansible_playbook() -> str:
    return ansible_tool("ansible-playbook")


def inventory_order(inventory: Path) -> list[str]:
    """The inventory's hosts in the order it lists them (the order a serial deploy takes), via
    `ansible-inventory --list`; empty if it cannot be read (the caller then keeps the order it has)."""
    result = proc.run([ansible_tool("ansible-inventory"), "-i", str(inventory), "--list"], check=False, timeout=60)
    try:
        groups = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        return []
    order: list[str] = []

    def walk(group: str) -> None:
        for host in groups.get(group, {}).get("hosts", []):
            if host not in order:
                order.append(host)
        for child in groups.get(group, {}).get("children", []):
            walk(child)

    walk("all")
    return order


def parse_serial(spec: str) -> str:
    """--serial: hosts per batch, a count or a percentage of the inventory."""
    m = SERIAL_RE.match(spec.strip())
    if not m or (m.group(2) and int(m.group(1)) > 100):
        raise ClusterctlError(f"--serial {spec!r} is not a positive count or percentage",
                              "e.g. --serial 1 (one host at a time) or --serial 25%")
    return spec.strip()


def check_inventory(inventory: Path) -> Path:
    if not inventory.exists():
        raise ClusterctlError(f"inventory {inventory} does not exist", "pass an Ansible inventory file or directory")
    return inventory.resolve()


# --- the release ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Release:
    """A release ready to ship: its id (name-contenthash), the tarball and the wheels to install."""

    id: str
    tarball: Path
    wheel_files: tuple[str, ...]
    pip_wheel: str = ""


def _app_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for f in sorted(filenames):
            if not f.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / f


def _clusterctl_source(work: Path) -> str:
    """What `pip wheel` builds clusterctl from: this checkout if we run from one, else a wheel packed from the
    installed distribution's own files (written into `work`), so the hosts get this very clusterctl even
    where no index has its version."""
    src = Path(__file__).resolve().parent.parent.parent  # the checkout holding clusterctl/, if it is one
    pyproject = src / "pyproject.toml"
    if pyproject.is_file() and re.search(r'^name\s*=\s*"clusterctl"', pyproject.read_text(), re.M):
        return str(src)
    return str(wheel_from_installed(importlib.metadata.distribution("clusterctl"), work))


_NOT_SHIPPED = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")


def wheel_from_installed(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists (byte-compiled files, scripts
    outside site-packages and the installer's own notes left out) with a fresh RECORD."""
    files = [f for f in dist.files or () if f.parts[0] != ".." and "__pycache__" not in f.parts
             and f.suffix != ".pyc"]
    info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    name = dist.metadata["Name"]
    if info is None or not any(f.parts[0] == name.replace("-", "_") for f in files):
        raise ClusterctlError(f"the installed {name} has no package files to ship (an editable install?)",
                              "deploy from its source checkout, or pass --wheels DIR with a built wheel")
    tag = next((ln.split(":", 1)[1].strip() for ln in (dist.read_text("WHEEL") or "").splitlines()
                if ln.startswith("Tag:")), "py3-none-any")
    path = out / f"{name.replace('-', '_')}-{dist.version}-{tag}.whl"
    out.mkdir(parents=True, exist_ok=True)
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for f in files:
            if f.parts[0] == info and f.name in _NOT_SHIPPED:
                continue
            data = Path(str(f.locate())).read_bytes()
            whl.writestr(f.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f.as_posix()},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def build_wheels(out: Path, app_wheel: Path | None = None, requirements: Path | None = None) -> list[Path]:
    """Wheels of clusterctl, its dependencies and the app (with its dependencies), for hosts without network.

    Built with this interpreter's pip, so the hosts must share this machine's platform and Python minor
    version (or pass --wheels with wheels built for them)."""
    out.mkdir(parents=True, exist_ok=True)
    packed = Path(tempfile.mkdtemp(prefix="clusterctl-wheel-"))
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(out),
            _clusterctl_source(packed), "pip"]
    if app_wheel is not None:
        argv.append(str(app_wheel))
    if requirements is not None:
        argv += ["-r", str(requirements)]
    try:
        result = proc.run(argv, check=False, timeout=900)
    finally:
        shutil.rmtree(packed, ignore_errors=True)
    if result.returncode != 0:
        tail = "; ".join((result.stderr or result.stdout or "").strip().splitlines()[-3:])
        raise ClusterctlError(f"could not build the wheels for the hosts: {tail or 'pip wheel failed'}",
                              "check that pip can reach an index here, or pass --wheels DIR with prebuilt wheels")
    return sorted(out.glob("*.whl"))


def _tarinfo(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """World-readable, root-owned entries: the workers may run as a DynamicUser= with no group rights."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    executable = info.isdir() or info.mode & 0o100
    info.mode = 0o755 if executable else 0o644
    return info


def build_release(release: Path, work: Path, *, settings: dict[str, Any], wheels: Path | None = None,
                  extra_hash: bytes = b"", progress: Progress = print) -> Release:
    """Make the payload for `release` (an app wheel or a directory of app code) in `work`.

    The id is the release's name plus a hash of everything shipped and the settings its units are
    generated with, so the same release deploys as a no-op and any change gets a new directory."""
    release = release.resolve()
    is_wheel = release.is_file() and release.suffix == ".whl"
    if not is_wheel and not release.is_dir():
        raise ClusterctlError(f"--release {release}: not a wheel (.whl) or a directory",
                              "pass the app's wheel (pip wheel . -w dist) or the directory the app imports from")
    wheel_dir = work / "wheels"
    if wheels is not None:
        if not wheels.is_dir() or not any(wheels.glob("clusterctl-*.whl")):
            raise ClusterctlError(f"--wheels {wheels}: no clusterctl-*.whl there",
                                  "build them with: pip wheel clusterctl -w DIR (on the hosts' platform)")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        for w in wheels.glob("*.whl"):
            shutil.copy2(w, wheel_dir / w.name)
        if is_wheel:
            shutil.copy2(release, wheel_dir / release.name)
    else:
        requirements = release / "requirements.txt" if not is_wheel else None
        progress("building wheels for the hosts (pip wheel)")
        build_wheels(wheel_dir, release if is_wheel else None,
                     requirements if requirements is not None and requirements.is_file() else None)
    wheel_files = sorted(w.name for w in wheel_dir.glob("*.whl"))
    # install clusterctl and the app by name; pip takes their dependencies from the same directory
    install = [w for w in wheel_files if w.startswith("clusterctl-") or (is_wheel and w == release.name)]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + extra_hash)
    for w in wheel_files:
        digest.update(w.encode() + hashlib.sha256((wheel_dir / w).read_bytes()).digest())
    app_files = [] if is_wheel else list(_app_files(release))
    for f in app_files:
        digest.update(str(f.relative_to(release)).encode() + b"\0" + f.read_bytes())
    stem = release.name.split("-")[0] + "-" + release.name.split("-")[1] if is_wheel else release.name
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:40] or "release"
    rid = f"{stem}-{digest.hexdigest()[:12]}"
    tarball = work / f"{rid}.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(wheel_dir, "wheels", filter=_tarinfo)
        app_root = tarfile.TarInfo("app")
        app_root.type = tarfile.DIRTYPE
        tar.addfile(_tarinfo(app_root))
        for f in app_files:
            tar.add(f, f"app/{f.relative_to(release)}", recursive=False, filter=_tarinfo)
        meta = json.dumps({"id": rid, "source": str(release), "settings": settings}, indent=2).encode()
        info = _tarinfo(tarfile.TarInfo("release.json"))
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    pip = [w for w in wheel_files if w.startswith("pip-") and w.endswith("-py3-none-any.whl")]
    return Release(rid, tarball, tuple(install), pip[-1] if pip else "")


def _inventory_hash(inventory: Path) -> bytes:
    """Inventory vars can change the generated units, so they are part of the release id."""
    files = [inventory] if inventory.is_file() else sorted(p for p in inventory.rglob("*") if p.is_file())
    return b"".join(hashlib.sha256(p.read_bytes()).digest() for p in files)


# --- running the playbook ------------------------------------------------------------------------------

def ansible_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our callback for the output; pipelining for speed; the user's own ANSIBLE_* settings otherwise win."""
    env = dict(os.environ)
    env.update({"ANSIBLE_STDOUT_CALLBACK": EVENT_CALLBACK,
                "ANSIBLE_CALLBACK_PLUGINS": str(ansible_dir() / "callback_plugins"),
                "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                "ANSIBLE_FORCE_COLOR": "0", "PYTHONUNBUFFERED": "1"})
    env.setdefault("ANSIBLE_PIPELINING", "1")
    env.setdefault("ANSIBLE_PYTHON_INTERPRETER", "auto_silent")
    env.setdefault("ANSIBLE_DEPRECATION_WARNINGS", "0")
    env.update(extra or {})
    return env


def run_playbook(playbook: str, inventory: Path, extra_vars: dict[str, Any], *, check: bool = False,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run one of our playbooks; returns every event (JSON line of the callback) in order."""
    events: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="clusterctl-ansible-") as tmp:
        vars_file = Path(tmp) / "vars.json"
        vars_file.write_text(json.dumps(extra_vars))
        argv = [ansible_playbook(), "-i", str(inventory), str(ansible_dir() / playbook), "-e", f"@{vars_file}"]
        if check:
            argv.append("--check")
        for line in proc.stream(argv, env=ansible_env({"ANSIBLE_LOCAL_TEMP": tmp})):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "text", "line": line.rstrip("\n")}
            if not isinstance(event, dict):
                continue
            events.append(event)
            if on_event is not None:
                on_event(event)
    if not any(e.get("event") == "stats" for e in events):
        text = "; ".join(e["line"] for e in events if e.get("event") == "text" and e["line"].strip())[-500:]
        raise ClusterctlError(f"ansible-playbook did not finish: {text or 'see its errors above'}",
                              "check the inventory and the Ansible installation (ansible-playbook --version)")
    return events


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def explain(event: dict[str, Any]) -> ClusterctlError:
    """One clear error for one failed or unreachable host."""
    host = event.get("host", "?")
    msg = str(event.get("msg") or "").strip()
    text = " ".join(str(event.get(k) or "") for k in ("msg", "module_stderr", "module_stdout", "stderr"))
    if event.get("event") == "unreachable":
        detail = re.sub(r"^Failed to connect to the host via ssh:\s*", "", _last_line(msg) or "no answer")
        if "Permission denied" in text or "Too many authentication failures" in text:
            return ClusterctlError(f"{host}: ssh refused the login ({detail})",
                                   "check ansible_user and the key (ansible_ssh_private_key_file) in the inventory, "
                                   "and that its public key is in the user's authorized_keys on the host")
        if "Host key verification failed" in text:
            return ClusterctlError(f"{host}: the host's ssh key is not the known one ({detail})",
                                   "check the host, then update known_hosts (ssh-keyscan)")
        return ClusterctlError(f"{host}: unreachable over ssh ({detail})",
                               "check its address (ansible_host) in the inventory and that sshd runs there")
    m = re.search(r"(/[^\s:]*python[^\s:]*): (?:not found|No such file or directory)", text)
    if m or (event.get("rc") == 127 and "interpreter" in msg):
        where = m.group(1) if m else "the configured interpreter"
        return ClusterctlError(f"{host}: no python on the host ({where} not found), so Ansible cannot run there",
                               "install python3 on the host, or set ansible_python_interpreter in the inventory")
    task = str(event.get("task", ""))
    if task.startswith("clusterctl | report") or msg.startswith(f"{host}:"):
        return ClusterctlError(" ".join(msg.split()))
    why = _last_line(str(event.get("stderr") or "")) or _last_line(msg) or "failed"
    return ClusterctlError(f"{host}: {task.removeprefix('clusterctl | ')} failed: {why}")


def failure(events: list[dict[str, Any]]) -> ClusterctlError | None:
    """The first host that failed (in the order Ansible reported it), with a count of the others."""
    bad = [e for e in events if e.get("event") == "unreachable" or (e.get("event") == "failed" and not e.get("ignored"))]
    if not bad:
        stats = next(e for e in reversed(events) if e.get("event") == "stats")
        if not stats.get("hosts"):
            return ClusterctlError("no host in the inventory matched", "check the inventory (ansible-inventory -i INV --graph)")
        return None
    # a task that failed inside a block is followed by the role's rescue, which ends in a "report" task
    # with the whole story (what failed, and where the host was moved back to): prefer that one
    reports = [e for e in bad if str(e.get("task", "")).startswith("clusterctl | report")]
    chosen = reports[0] if reports else bad[0]
    first = explain(chosen)
    others = sorted({e.get("host", "?") for e in bad} - {chosen.get("host")})
    if others:
        first.message += f" (also failed: {', '.join(others)})"
    return first


# --- deploy ----------------------------------------------------------------------------------------------

@dataclass
class HostOutcome:
    host: str
    plan: str = ""
    switched: bool = False


@dataclass
class DeployResult:
    release: str
    hosts: list[HostOutcome] = field(default_factory=list)


def deploy(inventory: Path, *, release: Path | None = None, rollback: bool = False, name: str | None = None,
           app: str | None = None, workers: str | None = None, listen: tuple[str, ...] = (),
           generate_args: tuple[str, ...] = (), serial: str = "1", health_url: str | None = None,
           timeout: float | None = None, check: bool = False, wheels: Path | None = None,
           progress: Progress = print) -> DeployResult:
    """Build the release (unless rolling back), run deploy.yml, and raise one clear error on the first failure."""
    inventory = check_inventory(inventory)
    if rollback == (release is not None):
        raise ClusterctlError("pass either --release PATH|WHEEL or --rollback",
                              "e.g. clusterctl deploy --inventory hosts.ini --release dist/app-1.0-py3-none-any.whl")
    if name is not None and not NAME_RE.match(name):
        raise ClusterctlError(f"--name {name!r} is not a valid cluster name", "use the name the cluster runs under, e.g. web")
    if app is not None:
        parse_app(app)
    if health_url is not None and not health_url.startswith("/"):
        raise ClusterctlError(f"--health-url {health_url!r} must be a path", "e.g. --health-url /health")
    extra: dict[str, Any] = {"clusterctl_serial": parse_serial(serial), "clusterctl_rollback": rollback}
    given = {"clusterctl_name": name, "clusterctl_app": app, "clusterctl_workers": workers,
             "clusterctl_listen": list(listen) or None, "clusterctl_generate_args": list(generate_args) or None,
             "clusterctl_health_url": health_url, "clusterctl_timeout": timeout}
    extra.update({k: v for k, v in given.items() if v is not None})
    with tempfile.TemporaryDirectory(prefix="clusterctl-release-") as tmp:
        rid = ""
        if release is not None:
            settings = {k: v for k, v in given.items() if k not in ("clusterctl_health_url", "clusterctl_timeout")}
            rel = build_release(release, Path(tmp), settings=settings, wheels=wheels,
                                extra_hash=_inventory_hash(inventory), progress=progress)
            rid = rel.id
            extra.update({"clusterctl_release_id": rel.id, "clusterctl_release_tarball": str(rel.tarball),
                          "clusterctl_wheel_files": list(rel.wheel_files), "clusterctl_pip_wheel": rel.pip_wheel})
            progress(f"release {rel.id}: {rel.tarball.stat().st_size // 1024} KiB to ship")
        result = DeployResult(rid or "previous")
        outcomes: dict[str, HostOutcome] = {}

        def on_event(e: dict[str, Any]) -> None:
            host, task = e.get("host"), str(e.get("task", ""))
            if host is None:
                return
            outcome = outcomes.setdefault(host, HostOutcome(host))
            if e.get("event") == "ok" and task == "clusterctl | plan":
                outcome.plan = str(e.get("msg", "")).strip()
                progress(("would change " if check else "plan ") + outcome.plan)
            elif e.get("event") == "ok" and task.startswith(SWITCH_TASK):
                outcome.switched = True
                progress(f"{host}: switching to {extra.get('clusterctl_release_id') or 'its previous release'}")
            elif e.get("event") == "ok" and task.startswith((RELOAD_TASK, INSTALL_TASK)) and e.get("changed"):
                progress(f"{host}: {_last_line(str(e.get('stdout', '')))}")
            elif e.get("event") == "failed" and task.startswith("clusterctl | report"):
                outcome.switched = False

        events = run_playbook("deploy.yml", inventory, extra, check=check, on_event=on_event)
    err = failure(events)
    if err is not None:
        switched = [o.host for o in outcomes.values() if o.switched]
        if switched and not check:
            err.message += f"; already on the new release: {', '.join(switched)}"
        err.fix = err.fix or "fix the cause, then run the same deploy again (hosts already switched are skipped)"
        raise err
    result.hosts = list(outcomes.values())
    return result


# --- status of the fleet -----------------------------------------------------------------------------------

@dataclass
class HostStatus:
    host: str
    release: str = ""
    error: str = ""
    status: dict[str, Any] | None = None


@dataclass
class FleetStatus:
    name: str
    hosts: list[HostStatus] = field(default_factory=list)

    def instances(self) -> list[dict[str, Any]]:
        """One row per instance of every host: the single-host status columns plus host and release."""
        rows = []
        for h in self.hosts:
            for i in (h.status or {}).get("instances", []):
                rows.append({"host": h.host, "release": h.release, **i})
        return rows

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "hosts": [asdict(h) for h in self.hosts],
                           "instances": self.instances()}, indent=2)


def fleet_status(inventory: Path, name: str | None = None) -> FleetStatus:
    """`clusterctl status --json` of every host in the inventory, gathered in parallel through Ansible."""
    inventory = check_inventory(inventory)
    if name is not None and not NAME_RE.match(name):
        raise ClusterctlError(f"{name!r} is not a valid cluster name", "use the name the cluster runs under, e.g. web")
    events = run_playbook("status.yml", inventory, {"clusterctl_name": name} if name else {})
    hosts: dict[str, HostStatus] = {}
    fleet = FleetStatus(name or "")
    for e in events:
        host, task = e.get("host"), e.get("task")
        if host is None:
            continue
        hs = hosts.setdefault(host, HostStatus(host))
        if e.get("event") in ("failed", "unreachable"):
            hs.error = explain(e).message
        elif e.get("event") == "skipped" and task == "clusterctl | status":
            hs.error = "not deployed (no current release)"
        elif e.get("event") == "ok" and task == "clusterctl | release":
            hs.release = str(e.get("msg", ""))
        elif e.get("event") == "ok" and task == "clusterctl | status":
            if e.get("rc") == 0:
                try:
                    hs.status = json.loads(str(e.get("stdout", "")))
                    fleet.name = fleet.name or hs.status.get("name", "")  # type: ignore[union-attr]
                except json.JSONDecodeError:
                    hs.error = "clusterctl status printed no JSON"
            else:
                hs.error = _last_line(str(e.get("stderr", ""))) or f"clusterctl status exited {e.get('rc')}"
    rank = {h: i for i, h in enumerate(inventory_order(inventory))}
    fleet.hosts = sorted(hosts.values(), key=lambda h: rank.get(h.host, len(rank)))  # inventory order, not finish order
    if not fleet.hosts:
        raise ClusterctlError("no host in the inventory matched", "check the inventory (ansible-inventory -i INV --graph)")
    return fleet
