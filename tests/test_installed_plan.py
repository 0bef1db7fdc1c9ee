"""The plan installed beside the units (NAME.plan.json) is what operations read back and re-render from:
no unit file is parsed. Checked on a user manager's unit dir in a temporary directory (no systemd needed)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from clusterctl.control import converge, ops
from clusterctl.control import generate as gen
from clusterctl.control.plan import Plan, build_plan
from clusterctl.control.systemd import Systemd
from clusterctl.errors import ClusterctlError


@pytest.fixture
def sd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Systemd:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return Systemd(user=True)


def _plan(**options: object) -> Plan:
    return build_plan(**{"app": "myapp:app", "name": "web", "workers": "2", "python": "/usr/bin/python3",
                         "working_dir": "/", "check": False, **options})  # type: ignore[arg-type]


def _install_files(sd: Systemd, plan: Plan) -> Path:
    """What `install` copies, without systemctl: the rendered files into the unit dir."""
    unit_dir = sd.path(sd.unit_dir)
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in gen.render(plan).items():
        (unit_dir / name).write_text(text)
    return unit_dir


def test_installed_reads_the_plan_back(sd: Systemd) -> None:
    plan = _plan(listen=["127.0.0.1:9000", "unix:/run/web.sock"], env=["A=1"])
    _install_files(sd, plan)
    inst = ops.installed(sd, "web")
    assert inst.plan == plan
    assert (inst.workers, inst.listen, inst.service(2), inst.socket(1)) == (
        2, ("127.0.0.1:9000", "/run/web.sock"), "web@2.service", "web.socket")


def test_units_without_a_plan_get_one_error_naming_the_fix(sd: Systemd) -> None:
    unit_dir = _install_files(sd, _plan())
    (unit_dir / "web.plan.json").unlink()
    with pytest.raises(ClusterctlError, match=r"older clusterctl .*web.plan.json missing.* \(fix: .*clusterctl up"):
        ops.installed(sd, "web")
    change = converge.compare(sd, _plan())
    assert change is not None and change.socket and "web.plan.json: missing" in change.diff  # reinstalled with --force


def test_compare_is_plan_to_plan_for_the_count_and_unit_to_unit_for_the_rest(sd: Systemd) -> None:
    _install_files(sd, _plan())
    assert converge.compare(sd, _plan()).nothing  # type: ignore[union-attr]
    change = converge.compare(sd, _plan(workers="3"))
    assert change is not None and (change.old_workers, change.new_workers) == (2, 3)
    assert not (change.socket or change.service or change.task) and change.diff == ""
    change = converge.compare(sd, _plan(listen=["127.0.0.1:9001"]))
    assert change is not None and change.socket and not change.service
    change = converge.compare(sd, _plan(env=["A=2"]))
    assert change is not None and change.service and not change.socket
    shutil.rmtree(sd.path(sd.unit_dir))
    assert converge.compare(sd, _plan()) is None


def test_scale_rerenders_the_target_and_the_plan(sd: Systemd) -> None:
    plan = _plan(balance="reuseport")
    unit_dir = _install_files(sd, plan)
    ops._install_count(sd, plan, 3)
    assert (unit_dir / "web.target").read_text() == gen.render(dataclasses.replace(plan, workers=3))["web.target"]
    assert json.loads((unit_dir / "web.plan.json").read_text())["workers"] == 3
    assert ops.installed(sd, "web").workers == 3
    assert (unit_dir / "web@.service").read_text() == gen.render(plan)["web@.service"]  # scale leaves it alone
