"""clusterctl.deploy without hosts: option checks, release ids, and the one-line failure messages."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from clusterctl import deploy as dp
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
