"""Clusters for the end-to-end tests, set up and taken away the same way everywhere: a plan built from
generate's options, its units written and installed (and started) in a sandbox's systemd, and later
uninstalled; plus the security score of installed units (systemd-analyze security)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clusterctl.control import generate as gen
from clusterctl.control import ops
from clusterctl.control import sandbox as sb
from clusterctl.control.plan import build_plan
from clusterctl.control.systemd import Systemd

# The default units' `systemd-analyze security` exposure stays at or below this (lower is safer).
EXPOSURE_BOUND = 2.0


def quiet(_message: str) -> None:
    """A progress callback that prints nothing."""


def install(sd: Systemd, out: Path, *, start: bool = True, enable: bool = False, force: bool = False,
            **options: Any) -> list[str]:
    """build_plan(**options), its units written to `out` and installed (and started) in `sd`; the files installed."""
    gen.write(build_plan(**options), out, force=force)
    return ops.install(sd, out, enable=enable, start=start, progress=quiet)


def uninstall(sd: Systemd, name: str) -> None:
    ops.uninstall(sd, name, progress=quiet)


@contextlib.contextmanager
def installed(sd: Systemd, out: Path, **kwargs: Any) -> Iterator[list[str]]:
    """`install`, then uninstall on the way out, whatever happened inside."""
    written = install(sd, out, **kwargs)
    try:
        yield written
    finally:
        uninstall(sd, kwargs["name"])


def exposure(sandbox: sb.Sandbox, unit: str) -> float:
    """`systemd-analyze security`'s overall exposure of an installed unit."""
    out = sandbox.exec(["systemd-analyze", "security", "--no-pager", unit], check=False).stdout
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", out)
    assert m, out[-2000:]
    return float(m.group(1))
