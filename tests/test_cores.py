"""Core sizing from affinity and cgroup quotas, over fake /proc and cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterctl.control.cores import cgroup_cpu_quota, usable_cpus

V2_MOUNT = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNT = "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"


def fake(tmp: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp / "proc/self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    for rel, text in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return proc, tmp


def test_v2_quota(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, "0::/app.slice/web.service\n", V2_MOUNT,
                      {"sys/fs/cgroup/app.slice/web.service/cpu.max": "250000 100000\n"})
    budget = usable_cpus(proc, root, affinity=4)
    assert budget.quota == 2.5
    assert budget.workers == 2
    assert budget.explain().startswith("4 CPUs in affinity, quota 2.5")
    assert budget.explain().endswith("-> 2 workers")


def test_v2_parent_quota_is_tighter(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, "0::/a/b\n", V2_MOUNT, {
        "sys/fs/cgroup/a/cpu.max": "100000 100000\n",
        "sys/fs/cgroup/a/b/cpu.max": "max 100000\n",
    })
    quota, source = cgroup_cpu_quota(proc, root)
    assert quota == 1.0
    assert source is not None and source.endswith("a/cpu.max")


def test_v1_quota(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, "4:cpu,cpuacct:/docker/abc\n0::/\n", V1_MOUNT, {
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert usable_cpus(proc, root, affinity=8).workers == 3


def test_v1_no_quota(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, "4:cpu,cpuacct:/\n", V1_MOUNT, {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    budget = usable_cpus(proc, root, affinity=6)
    assert budget.quota is None
    assert budget.workers == 6
    assert "no cgroup CPU quota" in budget.explain()


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, "0::/x\n", V2_MOUNT, {})
    assert usable_cpus(proc, root, affinity=3).workers == 3


@pytest.mark.parametrize("quota,expected", [("50000 100000", 1), ("150000 100000", 1), ("1000000 100000", 2)])
def test_fractional_and_large_quota(tmp_path: Path, quota: str, expected: int) -> None:
    """A quota below one CPU still gives one worker; affinity smaller than the quota wins."""
    proc, root = fake(tmp_path, "0::/s\n", V2_MOUNT, {"sys/fs/cgroup/s/cpu.max": quota})
    assert usable_cpus(proc, root, affinity=2).workers == expected


def test_mount_root_inside_cgroup_namespace(tmp_path: Path) -> None:
    """A container sees its cgroup mount rooted at its own path: the path must not be doubled."""
    mount = "30 25 0:26 /kube/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    proc, root = fake(tmp_path, "0::/kube/pod1/ctr\n", mount, {"sys/fs/cgroup/ctr/cpu.max": "200000 100000"})
    assert cgroup_cpu_quota(proc, root)[0] == 2.0


def test_this_host() -> None:
    budget = usable_cpus()
    assert budget.workers >= 1
    assert budget.affinity >= budget.workers or budget.quota is not None
