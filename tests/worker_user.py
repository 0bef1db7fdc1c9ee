"""Which --user the end-to-end tests give their hardened units.

The default units run each worker as a DynamicUser=, which can read only world-readable files. `.ci/setup`
builds the venv from /usr/bin/python3 so that holds for a checkout in a world-readable place; but a
checkout under a 0700 directory, a pyenv python under /root, or an app in pytest's 0700 tmp dirs cannot
be read by such a user. There the tests fall back to `--user root`: every other hardening setting stays,
only the uid differs (tests/test_e2e_hardening.py checks the DynamicUser path whenever it is possible).
"""

from __future__ import annotations

import sys
from pathlib import Path

from clusterctl.control.plan import readable_by_anyone

REPO = Path(__file__).resolve().parent.parent


def worker_user(*paths: str | Path) -> str | None:
    """None (DynamicUser=) when an unprivileged user can read the interpreter, the repo and `paths`; else root."""
    needed = [sys.executable, str(REPO / "examples" / "hello.py"), *map(str, paths)]
    return None if all(readable_by_anyone(p) for p in needed) else "root"


def user_args(*paths: str | Path) -> list[str]:
    """The same, as `clusterctl generate` arguments."""
    user = worker_user(*paths)
    return ["--user", user] if user else []


def share_app(share: Path, module: str, source: str) -> Path:
    """Write MODULE.py into its own directory of a sandbox share, readable by a dynamic user; the directory."""
    appdir = share / module
    appdir.mkdir(exist_ok=True)
    (appdir / f"{module}.py").write_text(source)
    for p in (share, appdir):
        p.chmod(0o755)
    (appdir / f"{module}.py").chmod(0o644)
    return appdir
