"""Where each cluster runs, remembered from `up`/`install`, so every later command needs only its NAME.

A cluster can live in the host's systemd, the user manager, or a clusterctl sandbox. Asking the user to
repeat `--sandbox S` on every command was the first thing new users tripped over, so `up` and `install`
write one small JSON record per cluster under the invoking user's state dir, and `locate()` reads it.
Without a record it falls back to the host's manager (when systemd is PID 1) or the one running sandbox
that holds the cluster's units, and otherwise says everywhere it looked.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from clusterctl.control.unitnames import UnitNames
from clusterctl.errors import ClusterctlError

Where = Literal["host", "user", "sandbox"]


def state_home() -> Path:
    """clusterctl's state dir of the invoking user (XDG_STATE_HOME, else ~/.local/state)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "clusterctl"


def units_dir(name: str) -> Path:
    """Where `up` writes a cluster's units by default (and `down` removes them)."""
    return state_home() / "units" / name


def _path(name: str) -> Path:
    return state_home() / "clusters" / f"{name}.json"


@dataclass(frozen=True)
class Record:
    """One cluster's home: which manager, the units it was installed from, the file it came from."""

    name: str
    where: Where
    sandbox: str | None = None
    units: str | None = None
    config: str | None = None
    # host ports `up` forwards into the sandbox, and whether `up` booted that sandbox for this cluster
    forwards: tuple[int, ...] = ()
    booted_sandbox: bool = False

    def systemd(self) -> Systemd:
        return Systemd(sandbox=self.sandbox if self.where == "sandbox" else None, user=self.where == "user")

    @property
    def describe(self) -> str:
        return f"sandbox {self.sandbox}" if self.where == "sandbox" else ("the user manager" if self.where == "user"
                                                                           else "this host's systemd")


def where_of(sd: Systemd) -> Where:
    return "sandbox" if sd.sandbox else ("user" if sd.user else "host")


def load(name: str) -> Record | None:
    """The record of `name`, or None. A damaged record is an error naming the file."""
    path = _path(name)
    try:
        data = json.loads(path.read_text())
        data["forwards"] = tuple(data.get("forwards") or ())
        return Record(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise ClusterctlError(f"the record of cluster {name!r} ({path}) cannot be read: {e}",
                              f"remove it (rm {path}) and run `clusterctl up` again") from None


def save(record: Record) -> Path:
    path = _path(record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    tmp.replace(path)
    return path


def forget(name: str) -> None:
    _path(name).unlink(missing_ok=True)


def records() -> list[Record]:
    folder = state_home() / "clusters"
    found = [load(p.stem) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [r for r in found if r is not None]


def host_has_systemd() -> bool:
    return os.path.isdir("/run/systemd/system")


def sandboxes_holding(name: str) -> list[str]:
    """Running sandboxes whose system unit dir holds NAME.target."""
    out = []
    for info in sb.ls():
        if info.pid and Path(f"/proc/{info.pid}/root/etc/systemd/system/{UnitNames(name).target}").is_file():
            out.append(info.name)
    return out


def running_sandboxes() -> list[str]:
    return [i.name for i in sb.ls() if i.pid]


def locate(name: str, sandbox: str | None = None, user: bool = False, *, doing: str = "operate on") -> Systemd:
    """The manager cluster NAME lives in: --sandbox/--user when given, else its record, else the host's
    systemd (when it is PID 1), else the one running sandbox holding its units. `doing` names the command
    in the error that lists where it looked."""
    if sandbox and user:
        raise ClusterctlError("--sandbox and --user exclude each other", "pick one")
    if sandbox or user:
        return Systemd(sandbox=sandbox, user=user)
    record = load(name)
    if record is not None:
        if record.where == "sandbox" and not sb.is_running(str(record.sandbox)):
            raise ClusterctlError(
                f"cannot {doing} {name}: it was started in sandbox {record.sandbox}, which is not running",
                f"start it again with `clusterctl up`, or forget it with `clusterctl down {name}`")
        return record.systemd()
    if host_has_systemd():
        return Systemd()
    holding = sandboxes_holding(name)
    if len(holding) == 1:
        return Systemd(sandbox=holding[0])
    running = running_sandboxes()
    looked = (f"no record {_path(name)}; systemd is not PID 1 on this host; "
              + (f"running sandboxes {', '.join(running)} do not hold it" if not holding and running
                 else f"sandboxes {', '.join(holding)} all hold it" if holding else "no sandbox is running"))
    fix = (f"pass --sandbox {holding[0]}" if holding else
           "start it with `clusterctl up`, or say where it runs with --sandbox S or --user")
    raise ClusterctlError(f"cannot {doing} {name}: cluster {name!r} not found ({looked})", fix)
