"""The hardening settings and resource flags of `clusterctl generate`: rendering, each flag, bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.cli import cli
from clusterctl.control import generate as gen
from clusterctl.control.plan import build_plan, readable_by_anyone
from clusterctl.errors import ClusterctlError

HARDENING = ("CapabilityBoundingSet=", "AmbientCapabilities=", "NoNewPrivileges=yes", "ProtectSystem=strict",
             "PrivateTmp=yes", "PrivateDevices=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
             "ProtectKernelLogs=yes", "ProtectControlGroups=yes", "ProtectClock=yes", "ProtectHostname=yes",
             "ProtectProc=invisible", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces=yes",
             "RestrictRealtime=yes", "RestrictSUIDSGID=yes", "LockPersonality=yes", "MemoryDenyWriteExecute=yes",
             "SystemCallArchitectures=native", "SystemCallFilter=@system-service", "UMask=0077")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def service(**kw: object) -> str:
    kw.setdefault("app", "examples.hello:app")
    kw.setdefault("name", "web")
    kw.setdefault("workers", "2")
    kw.setdefault("python", "/usr/bin/python3")
    kw.setdefault("working_dir", "/srv" if os.path.isdir("/srv") else "/")
    kw.setdefault("check", False)
    return gen.render(build_plan(**kw))["web@.service"]  # type: ignore[arg-type]


def lines(text: str) -> set[str]:
    return set(text.splitlines())


def test_defaults_are_hardened_with_a_dynamic_user() -> None:
    svc = lines(service())
    assert set(HARDENING) <= svc
    assert "DynamicUser=yes" in svc
    assert "User=clusterctl-web" in svc  # one dynamic user shared by every instance (messaging: the runtime directory)
    assert "ProtectHome=yes" in svc
    assert "OOMPolicy=stop" in svc
    assert not any(x.startswith(("ReadWritePaths=", "BindReadOnlyPaths=", "MemoryHigh=", "TasksMax="))
                   for x in svc)


def test_user_nobody_is_refused() -> None:
    with pytest.raises(ClusterctlError, match="nobody"):
        service(user="nobody")


def test_user_replaces_dynamic_user() -> None:
    svc = lines(service(user="www-data"))
    assert "User=www-data" in svc and "DynamicUser=yes" not in svc
    assert set(HARDENING) <= svc


def test_no_harden_drops_everything() -> None:
    svc = lines(service(harden=False))
    assert not set(HARDENING) & svc
    assert "DynamicUser=yes" not in svc and not any(x.startswith("ProtectHome=") for x in svc)
    assert "Type=notify" in svc and "OOMPolicy=stop" in svc


def test_allow_wx_drops_only_memory_deny_write_execute() -> None:
    svc = lines(service(allow_wx=True))
    assert "MemoryDenyWriteExecute=yes" not in svc
    assert set(HARDENING) - {"MemoryDenyWriteExecute=yes"} <= svc


def test_rw_paths_are_normalised_and_deduplicated() -> None:
    svc = service(rw_path=["/var/lib/web/", "/var/cache/web", "/var/lib/web"])
    assert "ReadWritePaths=/var/lib/web /var/cache/web\n" in svc


@pytest.mark.parametrize("bad", ["relative/dir", "/has space", "/a/../b", "/", "/x%i", "/x$HOME", '/q"'])
def test_bad_rw_path(bad: str) -> None:
    with pytest.raises(ClusterctlError) as e:
        service(rw_path=[bad])
    assert "--rw-path" in str(e.value)


def test_protect_home_default_and_explicit() -> None:
    assert "ProtectHome=yes\n" in service()
    assert "ProtectHome=read-only\n" in service(protect_home="read-only")
    assert "ProtectHome=tmpfs\n" in service(protect_home="tmpfs")


def test_protect_home_relaxes_when_the_app_lives_in_a_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clusterctl.control.plan as plan_mod
    monkeypatch.setattr(plan_mod, "HOME_DIRS", (str(tmp_path),))
    app = tmp_path / "app"
    app.mkdir()
    assert "ProtectHome=read-only\n" in service(working_dir=str(app))
    with pytest.raises(ClusterctlError, match="--protect-home yes hides"):
        service(working_dir=str(app), protect_home="yes")
    with pytest.raises(ClusterctlError, match="--protect-home"):
        service(protect_home="sometimes")


def test_app_under_tmp_is_bound_back_read_only(tmp_path: Path) -> None:
    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip("pytest's tmp dir is not under /tmp here")
    top = "/tmp/" + str(tmp_path).split("/")[2]
    assert f"BindReadOnlyPaths={top}\n" in service(working_dir=str(tmp_path))
    assert "BindReadOnlyPaths" not in service(working_dir=str(tmp_path), harden=False)


def test_resource_flags() -> None:
    svc = lines(service(memory_high="400M", memory_max="512M", cpu_quota="150", tasks_max="64"))
    assert {"MemoryHigh=400M", "MemoryMax=512M", "CPUQuota=150%", "TasksMax=64"} <= svc
    assert "TasksMax=infinity" in service(tasks_max="infinity")


@pytest.mark.parametrize("kw,option", [
    ({"memory_high": "lots"}, "--memory-high"), ({"tasks_max": "0"}, "--tasks-max"),
    ({"tasks_max": "-5"}, "--tasks-max"), ({"tasks_max": "many"}, "--tasks-max"),
])
def test_bad_resource_flags(kw: dict[str, str], option: str) -> None:
    with pytest.raises(ClusterctlError) as e:
        service(**kw)
    assert option in str(e.value) and e.value.fix  # type: ignore[attr-defined]


def test_readable_by_anyone(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "app.py").write_text("")
    (private / "app.py").chmod(0o644)
    tmp_path.chmod(0o755)
    assert not readable_by_anyone(str(private / "app.py"))
    private.chmod(0o755)
    assert readable_by_anyone(str(private / "app.py")) == readable_by_anyone(str(tmp_path))
    assert not readable_by_anyone(str(tmp_path / "missing"))


def test_warning_when_a_dynamic_user_cannot_read_the_app(tmp_path: Path) -> None:
    private = tmp_path / "p"
    private.mkdir(mode=0o700)
    plan = build_plan(app="examples.hello:app", python="/usr/bin/python3", working_dir=str(private), check=False)
    assert any("--working-dir" in w and "--user" in w for w in plan.warnings)
    assert not build_plan(app="examples.hello:app", python="/usr/bin/python3", working_dir=str(private), check=False,
                          user="root").warnings


@needs_analyze
def test_cli_flags_render_and_verify(tmp_path: Path) -> None:
    out = tmp_path / "u"
    result = CliRunner().invoke(cli, [
        "generate", "--app", "examples.hello:app", "--name", "web", "--workers", "1", "--python", "/usr/bin/python3",
        "--working-dir", "/", "--no-check-import", "--output", str(out), "--rw-path", "/var/lib/web",
        "--protect-home", "read-only", "--allow-wx", "--memory-high", "200M", "--memory-max", "256M",
        "--tasks-max", "32", "--user", "www-data"])
    assert result.exit_code == 0, result.output
    svc = (out / "web@.service").read_text()
    for line in ("ReadWritePaths=/var/lib/web", "ProtectHome=read-only", "MemoryHigh=200M", "TasksMax=32", "User=www-data"):
        assert line + "\n" in svc
    assert "MemoryDenyWriteExecute" not in svc
    # the header reproduces the flags
    assert "--rw-path /var/lib/web --allow-wx --memory-high 200M --memory-max 256M --tasks-max 32" in svc


@needs_analyze
def test_no_harden_verifies_too(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["generate", "--app", "examples.hello:app", "--name", "web", "--workers", "1",
                                      "--python", "/usr/bin/python3", "--working-dir", "/", "--no-check-import",
                                      "--output", str(tmp_path / "u"), "--no-harden"])
    assert result.exit_code == 0, result.output
    assert "--no-harden" in (tmp_path / "u" / "web@.service").read_text()
