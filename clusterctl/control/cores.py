"""How many workers this host really lets us run: CPU affinity, then the cgroup CPU quota.

`os.cpu_count()` counts the machine's CPUs, not the ones we may use; `pm2 -i max` forked 48 workers in a
2-CPU container that way. Affinity (taskset, cpuset) and the CFS quota (docker --cpus, CPUQuota=) both
cap us, so the answer is min(len(affinity), floor(quota)), at least 1, with the reasoning kept so the
CLI can print it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuBudget:
    """Usable CPUs and the reasons for the figure."""

    affinity: int
    quota: float | None
    quota_source: str | None
    workers: int

    def explain(self) -> str:
        if self.quota is None:
            return f"{self.affinity} CPUs in affinity, no cgroup CPU quota -> {self.workers} workers"
        return (f"{self.affinity} CPUs in affinity, quota {self.quota:g} ({self.quota_source}) "
                f"-> {self.workers} workers")


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup filesystem in mountinfo."""
    out = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, rest = pre.split(), post.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((fields[3], fields[4], rest[0], set(rest[2].split(","))))
    return out


def _quota_v2(path: Path) -> float | None:
    try:
        quota, period = path.joinpath("cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(path: Path) -> float | None:
    try:
        quota = int(path.joinpath("cpu.cfs_quota_us").read_text())
        period = int(path.joinpath("cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_cpu_quota(
    proc_self: Path = Path("/proc/self"), sysroot: Path = Path("/")
) -> tuple[float | None, str | None]:
    """The tightest CPU quota on our cgroup or any ancestor, in CPUs, and which file said so.

    Both cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us / cpu.cfs_period_us`) are read, since hybrid
    hosts have both mounted; `sysroot` lets tests point at a fake tree.
    """
    try:
        cgroups = proc_self.joinpath("cgroup").read_text()
        mountinfo = proc_self.joinpath("mountinfo").read_text()
    except OSError:
        return None, None
    mounts = _mounts(mountinfo)
    best: tuple[float | None, str | None] = (None, None)
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, cgpath = parts
        v2 = hid == "0" and controllers == ""
        for root, mountpoint, fstype, opts in mounts:
            if v2 != (fstype == "cgroup2") or (not v2 and "cpu" not in controllers.split(",")):
                continue
            if not v2 and "cpu" not in opts:
                continue
            rel = cgpath
            if root != "/" and (rel == root or rel.startswith(root + "/")):
                rel = rel[len(root):]
            base = sysroot / mountpoint.lstrip("/")
            node = base / rel.lstrip("/")
            while True:
                q = _quota_v2(node) if v2 else _quota_v1(node)
                if q is not None and (best[0] is None or q < best[0]):
                    best = (q, str(node.joinpath("cpu.max" if v2 else "cpu.cfs_quota_us")))
                if node == base or base not in node.parents:
                    break
                node = node.parent
    return best


def usable_cpus(proc_self: Path = Path("/proc/self"), sysroot: Path = Path("/"),
                affinity: int | None = None) -> CpuBudget:
    """Workers for `--workers auto`: affinity capped by the cgroup quota, at least 1."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0))
    quota, source = cgroup_cpu_quota(proc_self, sysroot)
    workers = affinity if quota is None else min(affinity, math.floor(quota))
    return CpuBudget(affinity=affinity, quota=quota, quota_source=source, workers=max(1, workers))
