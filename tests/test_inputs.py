"""Every bad input answered with one line naming the problem and the fix, exit status 2, nothing written,
no traceback (issue 20); and clusterctl.toml read by generate. No systemd needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clusterctl.cli import cli
from clusterctl.control import plan as plan_mod
from clusterctl.control import registry

REPO = Path(__file__).resolve().parent.parent
APP = "def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'hi']\n"


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Records, units and sandboxes of these tests live in tmp dirs, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("CLUSTERCTL_SANDBOX_DIR", str(tmp_path / "sandboxes"))
    monkeypatch.delenv("CLUSTERCTL_SANDBOX", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    (project / "myapp.py").write_text(APP)
    monkeypatch.chdir(project)
    return tmp_path


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def one_error_line(result: Result, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, and one `Error:` line that contains every needle (and a fix or usage)."""
    assert result.exit_code == code, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def gen_args(tmp: Path, *extra: str) -> list[str]:
    return ["generate", "--app", "myapp:app", "--workers", "2", "--no-verify", "--output", str(tmp / "out"), *extra]


# --- option values refused by click before anything runs ---------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["reload", "web", "--pause", "-1"], "--pause"),
    (["reload", "web", "--timeout", "0"], "--timeout"),
    (["up", "--app", "myapp:app", "--host-port", "99999"], "--host-port"),
    (["up", "--app", "myapp:app", "--host-port", "-1"], "--host-port"),
    (["logs", "web", "-n", "-5"], "--lines"),
    (["sandbox", "up", "--name", "x", "--timeout", "0"], "--timeout"),
])
def test_out_of_range_values_are_usage_errors(private_state: Path, args: list[str], needle: str) -> None:
    one_error_line(run(*args), needle)
    assert not (private_state / "state").exists() and not (private_state / "sandboxes").exists()


# --- resource limits and users checked at generate time -----------------------------------------------

@pytest.mark.parametrize("extra,needles", [
    (["--memory-max", "1"], ["--memory-max 1 is too little", "at least 64M"]),
    (["--memory-max", "0"], ["--memory-max 0 is too little"]),
    (["--memory-max", "200%"], ["--memory-max 200%", "1% to 100%"]),
    (["--memory-high", "1G", "--memory-max", "512M"], ["--memory-high 1G is above --memory-max 512M"]),
    (["--memory-high", "90%", "--memory-max", "50%"], ["--memory-high 90% is above --memory-max 50%"]),
    (["--user", "nosuchuser"], ["--user nosuchuser: no such user", "useradd"]),
    (["--balance", "reuseport", "--listen", "unix:/run/x.sock"], ["--balance reuseport", "--balance shared"]),
])
def test_generate_refuses_limits_that_cannot_work(private_state: Path, extra: list[str], needles: list[str]) -> None:
    line = one_error_line(run(*gen_args(private_state, *extra)), *needles)
    assert "clusterctl bug" not in line
    assert not (private_state / "out").exists()


def test_sane_limits_pass(private_state: Path) -> None:
    result = run(*gen_args(private_state, "--memory-high", "400M", "--memory-max", "512M", "--user", "root"))
    assert result.exit_code == 0, result.output
    assert "MemoryMax=512M" in (private_state / "out" / "myapp@.service").read_text()


def test_app_that_hangs_on_import_is_bounded(private_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (Path.cwd() / "hangs.py").write_text("import time\ntime.sleep(60)\n" + APP)
    monkeypatch.setattr(plan_mod, "IMPORT_TIMEOUT", 1.0)
    result = run("generate", "--app", "hangs:app", "--no-verify", "--output", str(private_state / "out"))
    line = one_error_line(result, "hangs:app", "did not finish within 1s", "--no-check-import")
    assert "importlib" not in line and "sys.argv" not in line  # not the internal check script
    assert not (private_state / "out").exists()


def test_syntax_error_names_file_and_line(private_state: Path) -> None:
    (Path.cwd() / "badsyntax.py").write_text("x = 1\ndef app(:\n    pass\n")
    result = run("generate", "--app", "badsyntax:app", "--no-verify", "--output", str(private_state / "out"))
    one_error_line(result, "SyntaxError", f"{Path.cwd() / 'badsyntax.py'}, line 2")


def test_runtime_error_at_import_names_where(private_state: Path) -> None:
    (Path.cwd() / "raises.py").write_text("x = 1\nraise RuntimeError('database is down')\n")
    result = run("generate", "--app", "raises:app", "--no-verify", "--output", str(private_state / "out"))
    one_error_line(result, "RuntimeError: database is down", "raises.py, line 2")


def test_python_a_dynamic_user_cannot_read_is_refused(private_state: Path) -> None:
    private = private_state / "root-like"
    (private / "bin").mkdir(parents=True)
    private.chmod(0o700)
    (private / "bin" / "python").symlink_to(sys.executable)
    result = run(*gen_args(private_state, "--python", str(private / "bin" / "python")))
    one_error_line(result, "--python", "not readable by other users", "--user")
    assert not (private_state / "out").exists()
    ok = run(*gen_args(private_state, "--python", str(private / "bin" / "python"), "--user", "root", "--no-check-import"))
    assert ok.exit_code == 0, ok.output


# --- sandbox ---------------------------------------------------------------------------------------------

def test_sandbox_log_of_nothing_fails(private_state: Path) -> None:
    one_error_line(run("sandbox", "log", "NOSUCH"), "sandbox 'NOSUCH' does not exist", "sandbox ls")


def test_sandbox_wants_a_unit_that_exists(private_state: Path) -> None:
    one_error_line(run("sandbox", "up", "--name", "x", "--wants", "nosuch.service"), "--wants nosuch.service",
                   "list-unit-files")
    assert not (private_state / "sandboxes" / "x").exists()


# --- where a cluster lives ----------------------------------------------------------------------------

def test_unknown_cluster_says_where_it_looked(private_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "host_has_systemd", lambda: False)
    for args, doing in ((["status", "nosuch"], "show the status of"), (["logs", "nosuch"], "show the logs of"),
                        (["reload", "nosuch"], "reload"), (["send", "nosuch", "1", "{}"], "send to")):
        line = one_error_line(run(*args), f"cannot {doing} nosuch", "no record", "not PID 1", "clusterctl up")
        assert "install" not in line


def test_a_record_whose_sandbox_is_gone(private_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.save(registry.Record("web", "sandbox", "gone-box", None, None, (), True))
    one_error_line(run("status", "web"), "sandbox gone-box, which is not running", "clusterctl down web")
    down = run("down", "web")  # forgets it, and what up left on this side
    assert down.exit_code == 0, down.output
    assert registry.load("web") is None


def test_up_no_sandbox_without_systemd_writes_nothing(private_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "host_has_systemd", lambda: False)
    result = run("up", "--app", "myapp:app", "--no-sandbox", "--output", str(private_state / "out"))
    one_error_line(result, "--no-sandbox", "not running as PID 1", "nothing was written")
    assert not (private_state / "out").exists() and registry.load("myapp") is None


# --- clusterctl.toml -------------------------------------------------------------------------------------

TWO_APPS = f"""
[apps.web]
app = "myapp:app"
workers = 2
listen = ["127.0.0.1:8100"]
env = {{ GREETING = "hi there", MODE = "prod" }}
memory-max = "512M"
user = "root"

[apps.api]
app = "myapp:app"
workers = 1
listen = ["127.0.0.1:8101", "unix:/run/api.sock"]
python = "{sys.executable}"
harden = false
"""


def test_generate_reads_every_app_of_the_file(private_state: Path) -> None:
    Path("clusterctl.toml").write_text(TWO_APPS)
    result = run("generate", "--no-verify")
    assert result.exit_code == 0, result.output
    web = Path("units/web/web@.service").read_text()
    assert f"from {Path.cwd() / 'clusterctl.toml'} [apps.web]" in web.splitlines()[0]
    assert 'Environment="GREETING=hi there"' in web and "MemoryMax=512M" in web and "User=root" in web
    assert Path("units/web/web.target").read_text().count("Wants=web@") == 2
    api = Path("units/api/api.socket").read_text()
    assert "ListenStream=127.0.0.1:8101" in api and "ListenStream=/run/api.sock" in api
    assert "ProtectSystem" not in Path("units/api/api@.service").read_text()


def test_command_line_overrides_the_file(private_state: Path) -> None:
    Path("clusterctl.toml").write_text(TWO_APPS)
    result = run("generate", "--name", "web", "--workers", "3", "--no-verify")
    assert result.exit_code == 0, result.output
    assert Path("units/web/web.target").read_text().count("Wants=web@") == 3
    assert "MemoryMax=512M" in Path("units/web/web@.service").read_text()  # the rest still from the file
    assert not Path("units/api").exists()


def test_pyproject_tool_table(private_state: Path) -> None:
    Path("pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.clusterctl.apps.web]\napp = "myapp:app"\n'
                                      'workers = 1\n')
    result = run("generate", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "[tool.clusterctl.apps.web]" in Path("units/web/web@.service").read_text().splitlines()[0]


@pytest.mark.parametrize("text,needles", [
    ('[apps.web]\napp = "myapp:app"\nworkerz = 2\n', ["clusterctl.toml [apps.web]: unknown key 'workerz'", "'workers'"]),
    ('[apps.web]\napp = "myapp:app"\nworkers = [2]\n', ["[apps.web]: workers = [2] is not a single value"]),
    ('[apps.web]\napp = "myapp:app"\nworkers = "many"\n', ["[apps.web]: workers 'many' must be 'auto'"]),
    ('[apps.web]\napp = "myapp:app"\nmemory-max = "1"\n', ["[apps.web]: memory-max 1 is too little"]),
    ('[apps.web]\napp = "myapp:app"\nbalance = "random"\n', ["[apps.web]: balance = 'random'"]),
    ('[apps.web]\napp = "myapp:app"\nharden = "no"\n', ["[apps.web]: harden = 'no' is not true or false"]),
    ('[apps.web]\nworkers = 2\n', ["[apps.web]: no app"]),
    ('[apps.web]\napp = "myapp:app"\n[other]\nx = 1\n', ["unknown table or key 'other'"]),
    ('[apps.web\napp = 1\n', ["clusterctl.toml: not valid TOML"]),
    ('title = "x"\n', ["unknown table or key 'title'"]),
])
def test_bad_file_names_file_key_and_fix(private_state: Path, text: str, needles: list[str]) -> None:
    Path("clusterctl.toml").write_text(text)
    line = one_error_line(run("generate", "--no-verify"), "clusterctl.toml", *needles)
    assert "(fix: " in line
    assert not Path("units").exists()


def test_command_line_value_is_not_blamed_on_the_file(private_state: Path) -> None:
    Path("clusterctl.toml").write_text('[apps.web]\napp = "myapp:app"\n')
    line = one_error_line(run("generate", "--memory-max", "1", "--no-verify"), "--memory-max 1 is too little")
    assert "clusterctl.toml" not in line


def test_no_app_and_no_file(private_state: Path) -> None:
    one_error_line(run("generate"), "generate needs --app", "clusterctl.toml")
    one_error_line(run("down"), "down needs NAME", "clusterctl.toml")


def test_name_not_in_the_file(private_state: Path) -> None:
    Path("clusterctl.toml").write_text(TWO_APPS)
    one_error_line(run("generate", "--name", "nosuch", "--no-verify"), "has no app 'nosuch'", "web, api")


def test_absent_file_changes_nothing(private_state: Path) -> None:
    assert not os.path.exists("clusterctl.toml")
    result = run(*gen_args(private_state))
    assert result.exit_code == 0, result.output
    assert "regenerate rather than edit" in (private_state / "out" / "myapp@.service").read_text()
