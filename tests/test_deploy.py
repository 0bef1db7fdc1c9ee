"""clusterctl.control.deploy without hosts: option checks, release ids, and the one-line failure messages."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from clusterctl.control import deploy as dp
from clusterctl.errors import ClusterctlError


def test_parse_serial() -> None:
    assert dp.parse_serial("1") == "1" and dp.parse_serial("25%") == "25%"
    for bad in ("0", "-1", "x", "150%", ""):
        with pytest.raises(ClusterctlError, match="--serial"):
            dp.parse_serial(bad)


def test_ansible_dir_has_the_playbooks() -> None:
    d = dp.ansible_dir()
    assert (d / "deploy.yml").is_file() and (d / "status.yml").is_file()
    assert (d / "roles/clusterctl/tasks/switch.yml").is_file()
    assert (d / "callback_plugins/clusterctl_events.py").is_file()


def _fake_wheels(d: Path) -> Path:
    d.mkdir()
    for name in ("clusterctl-0.1.0-py3-none-any.whl", "click-8.1.0-py3-none-any.whl", "pip-24.0-py3-none-any.whl"):
        (d / name).write_bytes(name.encode())
    return d


def test_release_id_follows_content_and_settings(tmp_path: Path) -> None:
    wheels = _fake_wheels(tmp_path / "wheels")
    app = tmp_path / "app"
    (app / "__pycache__").mkdir(parents=True)
    (app / "web.py").write_text("app = None\n")
    (app / "__pycache__/web.cpython-311.pyc").write_bytes(b"x")

    def rid(n: int, settings: dict[str, object]) -> dp.Release:
        return dp.build_release(app, tmp_path / f"w{n}", settings=settings, wheels=wheels, progress=lambda m: None)

    a, b = rid(1, {"clusterctl_app": "web:app"}), rid(2, {"clusterctl_app": "web:app"})
    assert a.id == b.id and a.id.startswith("app-")
    assert a.wheel_files == ("clusterctl-0.1.0-py3-none-any.whl",) and a.pip_wheel == "pip-24.0-py3-none-any.whl"
    assert rid(3, {"clusterctl_app": "web:other"}).id != a.id
    (app / "web.py").write_text("app = 1\n")
    assert rid(4, {"clusterctl_app": "web:app"}).id != a.id
    with tarfile.open(a.tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "app/web.py" in members and not any("__pycache__" in n for n in members)
    assert all(m.uid == 0 and m.mode & 0o004 for m in members.values())  # world-readable for DynamicUser=


def test_bad_release_and_wheels(tmp_path: Path) -> None:
    with pytest.raises(ClusterctlError, match="not a wheel"):
        dp.build_release(tmp_path / "missing", tmp_path / "w", settings={}, wheels=tmp_path)
    (tmp_path / "app").mkdir()
    with pytest.raises(ClusterctlError, match="no clusterctl"):
        dp.build_release(tmp_path / "app", tmp_path / "w", settings={}, wheels=tmp_path)


@pytest.mark.parametrize(("event", "expect"), [
    ({"event": "unreachable", "host": "h9", "msg": "Failed to connect to the host via ssh: ssh: connect to host "
      "10.0.0.9 port 22: No route to host"}, "h9: unreachable over ssh (ssh: connect to host 10.0.0.9 port 22"),
    ({"event": "unreachable", "host": "h1", "msg": "Failed to connect to the host via ssh: root@10.0.0.1: "
      "Permission denied (publickey,password)."}, "h1: ssh refused the login"),
    ({"event": "failed", "host": "h2", "rc": 127, "msg": "The module failed to execute correctly, you probably need "
      "to set the interpreter.", "module_stderr": "/bin/sh: 1: /usr/bin/python3: not found\n"},
     "h2: no python on the host (/usr/bin/python3 not found)"),
    ({"event": "failed", "host": "h1", "task": "clusterctl | report the failure",
      "msg": "h1: release r3-1 failed at 'rolling reload onto the release': boom;\n moved back to release r2-1"},
     "h1: release r3-1 failed at 'rolling reload onto the release': boom; moved back to release r2-1"),
    ({"event": "failed", "host": "h3", "task": "clusterctl | something", "msg": "non-zero return code",
      "stderr": "line\nError: it broke\n"}, "h3: something failed: Error: it broke"),
])
def test_explain(event: dict[str, object], expect: str) -> None:
    assert dp.explain(event).message.startswith(expect)


def test_failure_prefers_the_rescue_report_and_names_the_others() -> None:
    events = [
        {"event": "failed", "host": "h1", "task": "clusterctl | rolling reload onto the release", "msg": "rc 1"},
        {"event": "failed", "host": "h1", "task": "clusterctl | report the failure", "msg": "h1: release X failed"},
        {"event": "unreachable", "host": "h2", "msg": "No route to host"},
        {"event": "stats", "hosts": {"h1": {}, "h2": {}}},
    ]
    err = dp.failure(events)
    assert err is not None and err.message == "h1: release X failed (also failed: h2)"
    assert dp.failure([{"event": "ok", "host": "h1"}, {"event": "stats", "hosts": {"h1": {}}}]) is None
    assert "no host" in str(dp.failure([{"event": "stats", "hosts": {}}]))


def test_wheel_from_an_installed_clusterctl_installs_without_an_index(tmp_path: Path) -> None:
    """deploy from a pip-installed clusterctl (no checkout) ships that clusterctl: a wheel packed from the
    installed files, installable with no index at all."""
    import importlib.metadata
    import subprocess
    import sys
    import zipfile

    site = tmp_path / "site"
    (site / "clusterctl" / "templates").mkdir(parents=True)
    (site / "clusterctl" / "__init__.py").write_text('__version__ = "9.9.9"\n')
    (site / "clusterctl" / "templates" / "app.target.j2").write_text("[Unit]\n")
    (site / "clusterctl" / "__pycache__").mkdir()
    (site / "clusterctl" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    info = site / "clusterctl-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clusterctl\nVersion: 9.9.9\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("".join(f"{p},,\n" for p in (
        "clusterctl/__init__.py", "clusterctl/templates/app.target.j2", "clusterctl/__pycache__/x.pyc",
        "clusterctl-9.9.9.dist-info/METADATA", "clusterctl-9.9.9.dist-info/WHEEL",
        "clusterctl-9.9.9.dist-info/INSTALLER", "clusterctl-9.9.9.dist-info/RECORD", "../../bin/clusterctl")))
    wheel = dp.wheel_from_installed(importlib.metadata.PathDistribution(info), tmp_path / "out")
    assert wheel.name == "clusterctl-9.9.9-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "clusterctl/templates/app.target.j2" in names and "clusterctl-9.9.9.dist-info/RECORD" in names
    assert not any("__pycache__" in n or "INSTALLER" in n or n.startswith("..") for n in names)
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True)
    assert (target / "clusterctl" / "__init__.py").read_text() == '__version__ = "9.9.9"\n'
    assert (target / "clusterctl" / "templates" / "app.target.j2").is_file()


def test_wheel_from_an_editable_install_is_refused(tmp_path: Path) -> None:
    import importlib.metadata

    info = tmp_path / "clusterctl-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clusterctl\nVersion: 1.0\n")
    (info / "RECORD").write_text("__editable__.clusterctl-1.0.pth,,\nclusterctl-1.0.dist-info/METADATA,,\n")
    with pytest.raises(ClusterctlError, match="editable"):
        dp.wheel_from_installed(importlib.metadata.PathDistribution(info), tmp_path / "out")


def test_deploy_takes_its_app_from_clusterctl_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from clusterctl.cli import cli

    seen: dict[str, object] = {}

    def fake_deploy(inventory: Path, **kw: object) -> None:
        seen.update(kw)
        raise ClusterctlError("stop here")

    monkeypatch.setattr(dp, "deploy", fake_deploy)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clusterctl.toml").write_text(
        '[apps.web]\napp = "myapp:app"\nworkers = 3\nlisten = ["0.0.0.0:8000"]\nenv = { A = "1" }\n'
        'memory-max = "512M"\nharden = false\nworking-dir = "/home/me/src"\n')
    result = CliRunner().invoke(cli, ["deploy", "--inventory", "hosts.ini", "--generate-arg=--tasks-max=64"])
    assert "stop here" in result.output
    assert seen["name"] == "web" and seen["app"] == "myapp:app" and seen["workers"] == "3"
    assert seen["listen"] == ("0.0.0.0:8000",)
    assert seen["generate_args"] == ("--env=A=1", "--memory-max=512M", "--no-harden", "--tasks-max=64")
