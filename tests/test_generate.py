"""`clusterctl generate`: the plan, both layouts, every bad input, systemd-analyze verify, units/ drift."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.cli import cli
from clusterctl.control import generate as gen
from clusterctl.control.cores import CpuBudget
from clusterctl.control.plan import build_plan, parse_listen
from clusterctl.errors import ClusterctlError

REPO = Path(__file__).resolve().parent.parent
SAMPLE_ARGS = ["--app", "examples.hello:app", "--name", "hello", "--workers", "2", "--python", "/usr/bin/python3",
               "--working-dir", "/srv", "--no-check-import"]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@pytest.fixture
def appdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "myapp.py").write_text(
        "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'hi']\n"
        "number = 3\n"
    )
    (tmp_path / "broken.py").write_text("raise RuntimeError('database is down')\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def generate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["generate", *args])
    return result.exit_code, result.output


# --- the plan -------------------------------------------------------------------------------------

def test_plan_defaults(appdir: Path) -> None:
    plan = build_plan(app="myapp:app", budget=CpuBudget(affinity=4, quota=2.5, quota_source="x", workers=2))
    assert plan.name == "myapp"
    assert plan.workers == 2
    assert plan.balance == "shared"
    assert [a.unit_value for a in plan.listen] == ["127.0.0.1:8000"]
    assert plan.python == sys.executable
    assert plan.working_dir == str(appdir)
    assert plan.stop_timeout > plan.drain_timeout


@pytest.mark.parametrize("value,unit,url", [
    ("8080", "8080", "http://127.0.0.1:8080/"),
    ("0.0.0.0:80", "0.0.0.0:80", "http://127.0.0.1:80/"),
    ("[::1]:9000", "[::1]:9000", "http://[::1]:9000/"),
    ("unix:/run/app.sock", "/run/app.sock", "unix:/run/app.sock"),
    ("/run/app.sock", "/run/app.sock", "unix:/run/app.sock"),
])
def test_listen_forms(value: str, unit: str, url: str) -> None:
    address = parse_listen(value)
    assert address.unit_value == unit
    assert address.url == url


# --- rendering ------------------------------------------------------------------------------------

def test_shared_layout(appdir: Path) -> None:
    plan = build_plan(app="myapp:app", name="web", workers="3", listen=["8080"], check=False)
    files = gen.render(plan)
    assert sorted(files) == ["web.plan.json", "web.socket", "web.target", "web@.service"]
    sock, svc, target = files["web.socket"], files["web@.service"], files["web.target"]
    assert "ListenStream=8080\n" in sock
    assert "ReusePort=yes\n" in sock
    assert "Service=web@1.service\n" in sock
    assert "Backlog=4096\n" in sock
    for line in ("Type=notify", "NotifyAccess=main", "Sockets=web.socket", "Requires=web.socket",
                 "After=web.socket network.target", "Restart=on-failure", "RestartSec=1",
                 "StartLimitIntervalSec=0", "KillMode=mixed", "WatchdogSec=10", "TimeoutStopSec=35",
                 f"WorkingDirectory={appdir}", "Environment=PYTHONUNBUFFERED=1"):
        assert line + "\n" in svc, line
    assert (f"ExecStart={sys.executable} -m clusterctl.worker --app myapp:app --name web --instance %i "
            "--drain-timeout 30 --backlog 4096\n") in svc
    assert [line for line in target.splitlines() if line.startswith("Wants=")] == [
        "Wants=web.socket", "Wants=web@1.service", "Wants=web@2.service", "Wants=web@3.service"]
    assert "WantedBy=multi-user.target" in target


def test_reuseport_layout(appdir: Path) -> None:
    plan = build_plan(app="myapp:app", name="web", workers="2", balance="reuseport", check=False)
    files = gen.render(plan)
    assert sorted(files) == ["web-listen@.socket", "web.plan.json", "web.target", "web@.service"]
    assert "Service=web@%i.service\n" in files["web-listen@.socket"]
    assert "ReusePort=yes\n" in files["web-listen@.socket"]
    assert "Sockets=web-listen@%i.socket\n" in files["web@.service"]
    assert "Requires=web-listen@%i.socket\n" in files["web@.service"]
    assert "Wants=web-listen@1.socket\nWants=web-listen@2.socket\n" in files["web.target"]


def test_options_reach_the_units(appdir: Path) -> None:
    plan = build_plan(app="myapp:app", name="web", workers="1", env=["GREETING=hello world 100%", 'Q="x"'],
                      memory_max="512M", cpu_quota="150", user="www-data", check=False)
    svc = gen.render(plan)["web@.service"]
    assert 'Environment="GREETING=hello world 100%%"\n' in svc
    assert 'Environment="Q=\\"x\\""\n' in svc
    assert "MemoryMax=512M\n" in svc
    assert "CPUQuota=150%\n" in svc
    assert "User=www-data\n" in svc


def test_ws_options_reach_exec_start_only_when_they_differ(appdir: Path) -> None:
    """The --ws-* settings travel plan -> ExecStart= -> the worker's parser; defaults leave the unit as it was."""
    from clusterctl.worker import options as worker

    def exec_start(**kw: object) -> tuple[list[str], str]:
        plan = build_plan(app="myapp:app", name="web", workers="1", check=False, **kw)  # type: ignore[arg-type]
        files = gen.render(plan)
        line = next(x for x in files["web@.service"].splitlines() if x.startswith("ExecStart="))
        return shlex.split(line.removeprefix("ExecStart=").replace("%i", "1"))[3:], files["web@.service"]

    argv, _ = exec_start(ws_max_size=16 * 1024 * 1024, ws_per_message_deflate=True, ws_ping_interval=20,
                         ws_ping_timeout=20.0)
    assert not [a for a in argv if a.startswith(("--ws", "--no-ws"))]
    argv, svc = exec_start(ws_max_size=65536, ws_per_message_deflate=False, ws_ping_interval=0,
                           ws_ping_timeout=2.5)
    assert argv[-7:] == ["--ws-max-size", "65536", "--no-ws-per-message-deflate", "--ws-ping-interval", "0",
                         "--ws-ping-timeout", "2.5"]
    assert "--ws-ping-timeout 2.5" in svc.splitlines()[1]  # the header's regenerate command has them too
    parsed = worker._parse_plain(argv)  # the worker's own (fast) parser takes them as they are
    assert parsed is not None
    cfg = worker.WorkerConfig(**parsed)
    assert (cfg.ws_max_size, cfg.ws_per_message_deflate, cfg.ws_ping_interval, cfg.ws_ping_timeout) == (
        65536, False, 0.0, 2.5)
    argv, _ = exec_start(ws_ping_interval=30)  # a whole number stays one
    assert argv[-2:] == ["--ws-ping-interval", "30"]


@pytest.mark.parametrize(("value", "size"), [("1048576", 1048576), ("1M", 1048576), ("16MiB", 16 * 1024 * 1024),
                                             ("64k", 65536), ("2G", 2 * 1024 ** 3), ("512B", 512)])
def test_ws_max_size_takes_sizes_with_units(appdir: Path, value: str, size: int) -> None:
    code, out = generate("--app", "myapp:app", "--name", "web", "--workers", "1", "--ws-max-size", value,
                         "--no-verify")
    assert code == 0, out
    svc = (appdir / "units/web/web@.service").read_text()
    assert (f"--ws-max-size {size}\n" in svc) == (size != 16 * 1024 * 1024)


@pytest.mark.parametrize("value", ["16X", "1.5M", "-1", "M", ""])
def test_ws_max_size_refuses_what_is_not_a_size(appdir: Path, value: str) -> None:
    code, out = generate("--app", "myapp:app", "--ws-max-size", value, "--no-verify")
    assert code == 2 and out.startswith("Error: --ws-max-size") and "is not a size in bytes" in out, out
    assert "--ws-max-size 1M" in out and len(out.strip().splitlines()) == 1, out


def test_worker_args_reach_the_workers_parser(appdir: Path) -> None:
    """--worker-args land at the end of ExecStart= and mean there what the worker's own parser says."""
    from clusterctl.worker import options as worker

    plan = build_plan(app="myapp:app", name="web", workers="1", check=False,
                      worker_args=["--threads 8 --max-requests=1000", "--keepalive-timeout 75 --no-access-log",
                                   "--max-memory-restart 512M"])
    line = next(x for x in gen.render(plan)["web@.service"].splitlines() if x.startswith("ExecStart="))
    cfg = worker.parse_args(shlex.split(line.removeprefix("ExecStart=").replace("%i", "1"))[3:])
    assert (cfg.app, cfg.instance, cfg.threads, cfg.max_requests, cfg.keepalive_timeout, cfg.access_log,
            cfg.max_memory_restart) == ("myapp:app", "1", 8, 1000, 75.0, False, 512 << 20)


def test_ws_options_on_a_wsgi_app_warn(appdir: Path) -> None:
    plan = build_plan(app="myapp:app", interface="wsgi", ws_ping_interval=5, check=False)
    assert any("--ws-* options apply to ASGI apps only" in w for w in plan.warnings)
    assert not [w for w in build_plan(app="myapp:app", interface="wsgi", check=False).warnings if "--ws-" in w]


@needs_analyze
def test_ws_options_through_the_cli_verify(appdir: Path) -> None:
    code, out = generate("--app", "myapp:app", "--name", "web", "--workers", "1", "--ws-max-size", "1048576",
                         "--no-ws-per-message-deflate", "--ws-ping-interval", "15", "--ws-ping-timeout", "0.5")
    assert code == 0 and "(verified)" in out, out
    svc = (appdir / "units/web/web@.service").read_text()
    assert ("--ws-max-size 1048576 --no-ws-per-message-deflate --ws-ping-interval 15 --ws-ping-timeout 0.5\n"
            in svc)
    up_help = CliRunner().invoke(cli, ["up", "--help"]).output  # `up` builds the same plan
    assert "--ws-ping-interval" in up_help and "--no-ws-per-message-deflate" in up_help


def test_exec_quote() -> None:
    assert gen.exec_quote("/opt/my app/python") == '"/opt/my app/python"'
    assert gen.exec_quote("100%") == "100%%"
    assert gen.exec_quote("$HOME") == "$$HOME"
    assert gen.exec_quote("plain") == "plain"


# --- the command ----------------------------------------------------------------------------------

@needs_analyze
def test_generate_writes_verified_units(appdir: Path) -> None:
    code, out = generate("--app", "myapp:app", "--name", "web", "--workers", "2", "-v")
    assert code == 0, out
    assert "workers: 2 (from --workers)" in out
    assert "(verified)" in out
    assert sorted(p.name for p in (appdir / "units/web").iterdir()) == ["web.plan.json", "web.socket", "web.target",
                                                                        "web@.service"]


def test_verbose_explains_auto_sizing(appdir: Path) -> None:
    code, out = generate("--app", "myapp:app", "--workers", "auto", "-v", "--no-verify")
    assert code == 0, out
    assert "CPUs in affinity" in out and "workers" in out


@needs_analyze
def test_rerun_shows_diff_and_needs_force(appdir: Path) -> None:
    assert generate("--app", "myapp:app", "--name", "web", "--workers", "2")[0] == 0
    code, out = generate("--app", "myapp:app", "--name", "web", "--workers", "2")
    assert code == 0 and "up to date" in out
    code, out = generate("--app", "myapp:app", "--name", "web", "--workers", "3")
    assert code != 0 and "--force" in out
    assert "Wants=web@3.service" not in (appdir / "units/web/web.target").read_text()
    code, out = generate("--app", "myapp:app", "--name", "web", "--workers", "3", "--diff")
    assert code == 0 and "+Wants=web@3.service" in out
    assert "Wants=web@3.service" not in (appdir / "units/web/web.target").read_text()
    code, out = generate("--app", "myapp:app", "--name", "web", "--workers", "3", "--balance", "reuseport", "--force")
    assert code == 0, out
    assert "removed" in out
    assert sorted(p.name for p in (appdir / "units/web").iterdir()) == ["web-listen@.socket", "web.plan.json",
                                                                        "web.target", "web@.service"]


BAD_INPUTS = [
    (["--app", "myapp"], "--app 'myapp' is not MODULE:CALLABLE"),
    (["--app", "my-app:app"], "is not MODULE:CALLABLE"),
    (["--app", "nosuch:app"], "module 'nosuch' not found"),
    (["--app", "myapp:nope"], "has no attribute 'nope'"),
    (["--app", "myapp:number"], "is a int, not a callable"),
    (["--app", "broken:app"], "raised RuntimeError: database is down"),
    (["--app", "myapp:app", "--name", "a@b"], "--name 'a@b' is not a valid unit name prefix"),
    (["--app", "myapp:app", "--name", "../etc"], "is not a valid unit name prefix"),
    (["--app", "myapp:app", "--listen", "0"], "port must be a number from 1 to 65535"),
    (["--app", "myapp:app", "--listen", "127.0.0.1:65536"], "port must be a number from 1 to 65535"),
    (["--app", "myapp:app", "--listen", "localhost:80"], "'localhost' is not an IP address"),
    (["--app", "myapp:app", "--listen", "::1:80"], "IPv6 addresses in brackets"),
    (["--app", "myapp:app", "--listen", "300.1.1.1:80"], "is not an IP address"),
    (["--app", "myapp:app", "--listen", "unix:relative"], "absolute path"),
    (["--app", "myapp:app", "--listen", "80", "--listen", "80"], "the same address twice"),
    (["--app", "myapp:app", "--workers", "0"], "--workers '0' must be 'auto' or a whole number"),
    (["--app", "myapp:app", "--workers", "many"], "must be 'auto' or a whole number"),
    (["--app", "myapp:app", "--python", "python3"], "is not an absolute path"),
    (["--app", "myapp:app", "--python", "/nonexistent/python"], "no executable file there"),
    (["--app", "myapp:app", "--working-dir", "/nonexistent"], "not a directory"),
    (["--app", "myapp:app", "--env", "NOEQUALS"], "is not KEY=VALUE"),
    (["--app", "myapp:app", "--memory-max", "lots"], "is not a size"),
    (["--app", "myapp:app", "--cpu-quota", "0"], "is not a positive percentage"),
    (["--app", "myapp:app", "--user", "Bad User"], "is not a valid user name"),
    (["--app", "myapp:app", "--drain-timeout", "0"], "--drain-timeout 0 is out of range"),
    (["--app", "myapp:app", "--timeout", "0"], "--timeout 0 is out of range"),
    (["--app", "myapp:app", "--worker-args", "--forwarded-allow-ips proxy.example"],
     "--forwarded-allow-ips 'proxy.example': not an IP address or network"),
    (["--app", "myapp:app", "--timeout", "-5"], "--timeout -5 is out of range"),
    (["--app", "myapp:app", "--worker-args", "--timeout 5"], "use clusterctl generate --timeout instead"),
    (["--app", "myapp:app", "--ws-max-size", "-1"], "--ws-max-size '-1' is not a size in bytes"),
    (["--app", "myapp:app", "--worker-args", "--threds 8"], "--worker-args '--threds 8' is not understood by the worker"),
    (["--app", "myapp:app", "--worker-args", "--threads"], "is not understood by the worker"),
    (["--app", "myapp:app", "--worker-args", "--threads -1"], "is not understood by the worker"),
    (["--app", "myapp:app", "--worker-args", "--bind 0.0.0.0:80"], "--worker-args --bind: generate sets it itself"),
    (["--app", "myapp:app", "--worker-args", "--app=other:app"], "--worker-args --app: generate sets it itself"),
    (["--app", "myapp:app", "--worker-args", "--loop tokio"], "is not an event loop"),
    (["--app", "myapp:app", "--worker-args", "--engine fast"], "--engine 'fast' is not an engine"),
    (["--app", "myapp:app", "--worker-args", "--max-memory-restart 5X"], "is not understood by the worker"),
    (["--app", "myapp:app", "--worker-args", "--ready-path health"], "--ready-path 'health' is not a request path"),
    (["--app", "myapp:app", "--worker-args", "'--threads 8"], "No closing quotation"),
    (["--app", "myapp:app", "--ws-max-size", "0"], "--ws-max-size 0 is not a positive number of bytes"),
    (["--app", "myapp:app", "--ws-ping-interval", "-5"], "--ws-ping-interval -5 is out of range"),
    (["--app", "myapp:app", "--ws-ping-interval", "nan"], "--ws-ping-interval nan is out of range"),
    (["--app", "myapp:app", "--ws-ping-interval", "7200"], "--ws-ping-interval 7200 is out of range"),
    (["--app", "myapp:app", "--ws-ping-timeout", "0"], "--ws-ping-timeout 0 is out of range"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_writes_nothing(appdir: Path, args: list[str], message: str) -> None:
    code, out = generate(*args, "--output", str(appdir / "out"))
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    assert message in out
    assert "(fix: " in out
    assert not (appdir / "out").exists()
    assert [p.name for p in appdir.iterdir() if p.name.startswith(".")] == []


def test_python_without_clusterctl(appdir: Path) -> None:
    system = shutil.which("python3", path="/usr/bin")
    if system is None:
        pytest.skip("no /usr/bin/python3")
    code, out = generate("--app", "myapp:app", "--python", system, "--output", str(appdir / "out"))
    assert code == 2
    assert "cannot import clusterctl" in out and "pip install clusterctl" in out
    assert not (appdir / "out").exists()


@needs_analyze
def test_verify_failure_leaves_nothing(appdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = gen.render

    def broken(plan):  # a unit systemd-analyze must reject: a misspelt Type= value
        files = real(plan)
        files[f"{plan.name}@.service"] = files[f"{plan.name}@.service"].replace("Type=notify", "Type=notifyy")
        return files

    monkeypatch.setattr(gen, "render", broken)
    code, out = generate("--app", "myapp:app", "--output", str(appdir / "out"))
    assert code == 2
    assert "Failed to parse service type" in out
    assert not (appdir / "out").exists()


# --- systemd-analyze verify over every layout -----------------------------------------------------

# reuseport with a unix socket is refused by generate (SO_REUSEPORT does not spread them; tests/test_inputs.py)
LAYOUTS = [(b, listen) for b in ("shared", "reuseport")
           for listen in (["8000"], ["127.0.0.1:8000", "[::1]:8000"], ["unix:/run/web.sock"])
           if not (b == "reuseport" and listen[0].startswith("unix:"))]


@needs_analyze
@pytest.mark.parametrize(("balance", "listen"), LAYOUTS)
def test_every_layout_verifies(appdir: Path, balance: str, listen: list[str]) -> None:
    plan = build_plan(app="myapp:app", name="web", workers="2", balance=balance, listen=listen,
                      memory_max="1G", cpu_quota="50%", env=["A=1"], check=False)
    gen.write(plan, appdir / "out")  # raises ClusterctlError if verify prints anything
    assert (appdir / "out/web.target").exists()


# --- units/ stays in step with the templates -------------------------------------------------------

def test_units_dir_matches_templates(tmp_path: Path) -> None:
    """units/hello is regenerated by the README's command; this fails if a template changed without it."""
    code = CliRunner().invoke(cli, ["generate", *SAMPLE_ARGS, "--output", str(tmp_path / "hello"), "--no-verify"])
    assert code.exit_code == 0, code.output
    expected = {p.name: p.read_text() for p in (tmp_path / "hello").iterdir()}
    actual = {p.name: p.read_text() for p in (REPO / "units/hello").iterdir()}
    assert actual == expected, "units/hello is stale: run the README's 'regenerate units/' command"


def test_error_type_is_user_facing() -> None:
    err = ClusterctlError("bad thing", "do this")
    assert str(err) == "bad thing (fix: do this)"


# --- the header's regenerate command --------------------------------------------------------------

# A value other than the default for every plan option (plan.PlanOptions) that shapes the units (check_import
# does not; --workers auto is resolved, so a number stands for it).
NON_DEFAULT = {
    "app": "myapp:app", "name": "web", "workers": "3", "listen": ("127.0.0.1:9001", "[::1]:9002"),
    "balance": "reuseport", "user": "www-data", "working_dir": "/srv", "python": "/usr/bin/python3",
    "env": ("A=1", "B=two words %x"), "memory_max": "512M", "memory_high": "400M", "cpu_quota": "150%",
    "tasks_max": "64", "harden": True, "rw_path": ("/var/lib/web",), "protect_home": "tmpfs", "allow_wx": True,
    "backlog": 512, "drain_timeout": 7, "watchdog_sec": 0, "timeout": 45, "interface": "asgi", "ws_max_size": 4096,
    "ws_per_message_deflate": False, "ws_ping_interval": 5.0, "ws_ping_timeout": 2.5, "every": "30s",
    "worker_args": ("--threads 4 --max-requests=500", "--keepalive-timeout 75 --no-access-log"),
    "task": "myapp:app",
}


def _replan(command: str) -> object:
    """The plan that the header's command builds, through the CLI's own option parsing."""
    from clusterctl.cli.generate import generate as generate_command
    from clusterctl.cli.generate import plan_from_options

    words = shlex.split(command)
    assert words[:2] == ["clusterctl", "generate"]
    ctx = generate_command.make_context("generate", [*words[2:], "--no-check-import"])
    with ctx:
        return plan_from_options(dict(ctx.params))


@pytest.mark.parametrize("options", [{"app": "myapp:app", "workers": "2"}, NON_DEFAULT,
                                     {**NON_DEFAULT, "harden": False, "protect_home": "read-only"}],
                         ids=["defaults", "every-option", "no-harden"])
def test_header_command_rebuilds_the_same_plan(appdir: Path, options: dict[str, object]) -> None:
    from clusterctl.control.plan import plan_option_specs

    settable = {key for key, _, _ in plan_option_specs()} - {"check_import"}
    assert set(NON_DEFAULT) == settable, "a new plan option: give it a non-default value here"
    plan = build_plan(**options, check=False)  # type: ignore[arg-type]
    header = gen.render(plan)[f"{plan.name}@.service"].splitlines()[1]
    assert header.startswith("# clusterctl generate ")
    assert _replan(header[2:]) == plan


def test_sqlite_database_in_the_app_dir_is_warned_about_with_the_fix(appdir: Path) -> None:
    """Django's startproject keeps db.sqlite3 beside the code: readable but not writable under the default
    hardening, so the first login fails. generate says so, and which options make it writable."""
    import sqlite3

    sqlite3.connect(appdir / "db.sqlite3").execute("create table t (x)").connection.commit()
    plan = build_plan(app="myapp:app", workers="1", check=False)
    (warning,) = [w for w in plan.warnings if "SQLite" in w]
    assert f"{appdir}/db.sqlite3" in warning and f"--rw-path {appdir}" in warning and "--user OWNER" in warning
    plan = build_plan(app="myapp:app", workers="1", rw_path=[str(appdir)], user="www-data", check=False)
    assert not [w for w in plan.warnings if "SQLite" in w]
    assert not [w for w in build_plan(app="myapp:app", workers="1", harden=False, check=False).warnings
                if "SQLite" in w]


def test_drain_shorter_than_timeout_is_warned_about(appdir: Path) -> None:
    assert not [w for w in build_plan(app="myapp:app", workers="1", check=False).warnings if "--timeout" in w]
    plan = build_plan(app="myapp:app", workers="1", timeout=120, check=False)
    assert any("--drain-timeout 30 is shorter than --timeout 120" in w for w in plan.warnings)


# --- the plan file beside the units (what ops and scale re-render from) ----------------------------

def test_plan_file_round_trips(appdir: Path) -> None:
    from clusterctl.control.plan import plan_from_json, plan_to_json

    for options in (NON_DEFAULT, {"app": "myapp:app", "listen": ("unix:/run/web.sock",)}):
        plan = build_plan(**options, check=False)  # type: ignore[arg-type]
        assert plan_from_json(plan_to_json(plan), "x") == plan
        assert gen.render(plan)[f"{plan.name}.plan.json"] == plan_to_json(plan)


def test_unreadable_plan_file_is_one_error_with_the_fix() -> None:
    from clusterctl.control.plan import plan_from_json

    for text in ("{", '{"format": 99}', '{"format": 1, "name": "web"}'):
        with pytest.raises(ClusterctlError, match=r"web.plan.json is not a plan .*regenerate the units"):
            plan_from_json(text, "web.plan.json")


def test_output_from_before_the_plan_file_is_completed_without_force(appdir: Path) -> None:
    """Units an older clusterctl wrote (no NAME.plan.json) are up to date but for the plan file: generate
    adds it instead of refusing to overwrite."""
    plan = build_plan(app="myapp:app", name="web", workers="1", check=False)
    gen.write(plan, appdir / "out", check_units=False)
    (appdir / "out/web.plan.json").unlink()
    assert gen.write(plan, appdir / "out", check_units=False).changed
    assert (appdir / "out/web.plan.json").is_file()
