"""Where systemd runs, and how we talk to it: this host's manager, a user manager, or a sandbox's.

Operations never call systemctl or journalctl themselves; they hold a `Systemd` and ask it. The same
operation then works on a real host and inside `clusterctl sandbox` (nsenter into its namespaces, and
its files through /proc/PID/root, which is the sandbox's overlay root as its PID 1 sees it).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from clusterctl import proc
from clusterctl.address import Address
from clusterctl.control import sandbox as sb
from clusterctl.errors import ClusterctlError


@dataclass(frozen=True)
class Systemd:
    """A systemd manager: the host's system manager, the user's (`user=True`), or a sandbox's."""

    sandbox: str | None = None
    user: bool = False

    # -- commands ------------------------------------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        return sb.exec_argv(self.sandbox, argv) if self.sandbox else list(argv)

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return proc.run(self.argv(argv), check=check, timeout=timeout, input=input)

    def systemctl(self, *args: str, check: bool = True, timeout: float | None = 120) -> subprocess.CompletedProcess[str]:
        scope = ["--user"] if self.user else []
        return self.run(["systemctl", "--no-pager", "--no-ask-password", *scope, *args], check=check, timeout=timeout)

    def journalctl_argv(self, *args: str) -> list[str]:
        scope = ["--user"] if self.user else []
        return self.argv(["journalctl", "--no-pager", *scope, *args])

    def journalctl(self, *args: str, timeout: float | None = 60) -> str:
        return proc.run(self.journalctl_argv(*args), timeout=timeout).stdout

    def follow(self, *args: str) -> Iterator[str]:
        return proc.stream(self.journalctl_argv(*args))

    @property
    def where(self) -> str:
        return f"sandbox {self.sandbox}" if self.sandbox else ("the user manager" if self.user else "this host")

    def check(self) -> None:
        """Fail with a clear message unless a systemd manager answers."""
        if self.sandbox:
            sb.pid(self.sandbox)  # raises a clear error if the sandbox is not running
        elif not self.user and not os.path.isdir("/run/systemd/system"):
            running = [i.name for i in sb.ls() if i.pid]
            raise ClusterctlError(
                "systemd is not running as PID 1 on this host, so there is no system manager here"
                + (f" (running sandboxes: {', '.join(running)})" if running else ""),
                "pass --sandbox S to use a clusterctl sandbox, or run `clusterctl up`, which boots one")
        r = self.systemctl("is-system-running", check=False, timeout=30)
        state = r.stdout.strip()
        if state in ("", "offline", "unknown"):
            raise ClusterctlError(f"systemd in {self.where} does not answer: {(r.stderr or state).strip()}",
                                  "check that systemd is running there (systemctl is-system-running)")

    def require_root(self) -> None:
        if not self.user and not self.sandbox and os.geteuid() != 0:
            raise ClusterctlError("changing system units needs root", "run it with sudo, or pass --user for your user manager")

    # -- files ---------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(f"/proc/{sb.pid(self.sandbox)}/root") if self.sandbox else Path("/")

    def path(self, path: str | Path) -> Path:
        """A path of that system's file tree, reachable from here."""
        return self.root / str(path).lstrip("/")

    @property
    def unit_dir(self) -> str:
        if self.user:
            return str(Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd/user")
        return "/etc/systemd/system"

    @property
    def state_dir(self) -> str:
        """Where install records what it wrote, so uninstall removes exactly that."""
        if self.user:
            return str(Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "clusterctl")
        return "/var/lib/clusterctl"

    # -- properties ----------------------------------------------------------------------------------
    def show(self, units: Sequence[str], props: Sequence[str]) -> list[dict[str, str]]:
        """`systemctl show` of several units at once: one dict of the asked properties per unit."""
        if not units:
            return []
        out = self.systemctl("show", "-p", ",".join(props), *units).stdout
        blocks: list[dict[str, str]] = []
        current: dict[str, str] = {}
        for line in [*out.splitlines(), ""]:
            if not line.strip():
                if current:
                    blocks.append(current)
                    current = {}
                continue
            key, _, value = line.partition("=")
            current[key] = value
        return blocks

    def list_units(self, pattern: str) -> list[str]:
        """Loaded units matching a glob, active or not."""
        out = self.systemctl("list-units", "--all", "--plain", "--no-legend", pattern).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    # -- network -------------------------------------------------------------------------------------
    def connect(self, address: Address, timeout: float = 5.0) -> socket.socket:
        """A connection to a socket unit's address as seen from that system (its loopback, its paths)."""
        if address.kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(self.path(str(address.path))) if self.sandbox else str(address.path))
            return s
        host, port = address.reach
        if self.sandbox:
            return sb.connect(self.sandbox, port, host, timeout)
        return socket.create_connection((host, port), timeout=timeout)
