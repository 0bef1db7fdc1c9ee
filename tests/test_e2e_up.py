"""`clusterctl up` / `down`, the README's main job: generate, boot a sandbox, install, start, forward."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.cli import cli
from clusterctl.control import sandbox as sb
from tests.ports import free_port
from tests.worker_user import user_args


@pytest.fixture
def box(sandbox_factory) -> str:
    """A sandbox name `up` will create itself; removed whatever happens."""
    sandbox_factory.reap_once()
    name = f"pytest-{os.getpid()}-up"
    yield name
    sb.down(name, missing_ok=True)


def test_up_serves_on_the_host_then_down_removes_everything(box: str, tmp_path) -> None:
    port = free_port()
    args = ["up", "--app", "examples.hello:app", "--name", "uptest", "--workers", "2", "--listen", "127.0.0.1:8300",
            *user_args(), "--sandbox", "--sandbox-name", box, "--host-port", str(port), "--output", str(tmp_path / "units")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "uptest: 2/2 instances READY" in result.output
    assert f"serving examples.hello:app on http://127.0.0.1:{port}/" in result.output
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        assert r.status == 200 and r.read() == b"Hello, world!\n"

    # the port is now taken on the host: a second cluster asking for it fails before starting anything
    again = CliRunner().invoke(cli, [*args[:4], "other", *args[5:-2], "--sandbox-name", "pytest-never-booted",
                                     "--output", str(tmp_path / "other")])
    assert again.exit_code != 0 and f"port {port} on the host's loopback is in use" in again.output
    assert not sb.is_running("pytest-never-booted")

    down = CliRunner().invoke(cli, ["down", "uptest", "--sandbox", box])
    assert down.exit_code == 0, down.output
    assert "removed /etc/systemd/system/uptest@.service" in down.output
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)


def test_up_with_a_bad_app_boots_nothing(box: str) -> None:
    result = CliRunner().invoke(cli, ["up", "--app", "examples.hello:nope", "--sandbox", "--sandbox-name", box])
    assert result.exit_code == 2
    assert "has no attribute 'nope'" in result.output
    assert not sb.is_running(box)


# --- issue 20: a cluster found by NAME alone, up converges, a failed up, clusterctl.toml ------------------

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def state(sandbox_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The registry and up's units in a tmp dir, no CLUSTERCTL_SANDBOX to help, and the sandboxes `up` boots
    in a dir of their own: they have no owner pid, so another test session's reaper of pytest-* sandboxes
    in the shared dir would take them for a crashed run's leftovers. All torn down afterwards."""
    sandbox_factory.reap_once()
    boxes = Path(tempfile.mkdtemp(prefix="clusterctl-test-", dir="/var/tmp"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("CLUSTERCTL_SANDBOX_DIR", str(boxes))
    monkeypatch.delenv("CLUSTERCTL_SANDBOX", raising=False)
    try:
        yield tmp_path / "state" / "clusterctl"
    finally:
        for info in sb.ls():
            sb.down(info.name, missing_ok=True)
        shutil.rmtree(boxes, ignore_errors=True)


def cli_ok(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def cli_error(*args: str, code: int = 2) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


def get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        return r.read()


def test_up_then_every_command_by_name_and_up_converges(state: Path) -> None:
    box = "convbox"
    name = "convtest"
    port, port2 = free_port(), free_port()
    base = ["up", "--app", "examples.hello:app", "--name", name, "--working-dir", str(REPO), *user_args(),
            "--sandbox", "--sandbox-name", box]
    out = cli_ok(*base, "--workers", "2", "--listen", f"127.0.0.1:{port}")
    assert f"clusterctl status {name} |" in out and "--sandbox" not in out.split("next:")[1]
    assert get(port) == b"Hello, world!\n"

    # every later command by NAME alone
    assert f"[sandbox {box}]" in cli_ok("status", name)
    assert "serving examples.hello:app" in cli_ok("logs", name, "-n", "50")
    assert "2/2 instances on the new code" in cli_ok("reload", name)
    assert "has no instance 9" in cli_error("logs", name, "--instance", "9")
    assert "'abc' is not an instance number" in cli_error("send", name, "abc", "{}")
    assert "--since 'yesterdayish' is not a time journalctl understands" in cli_error(
        "logs", name, "--since", "yesterdayish")
    assert "cannot show the logs of nosuch" in cli_error("logs", "nosuch")

    def instances() -> dict[str, tuple[str, int]]:
        st = json.loads(cli_ok("status", name, "--json"))
        return {i["instance"]: (i["state"], i["pid"]) for i in st["instances"]}

    # more workers: a scale, the running ones keep their pids
    before = instances()
    out = cli_ok(*base, "--workers", "3", "--listen", f"127.0.0.1:{port}")
    assert "workers 2 -> 3 (scale)" in out and "rolling reload" not in out
    after = instances()
    assert after["1"] == before["1"] and after["2"] == before["2"] and after["3"][0] == "active"

    # the same up after `scale 4` converges back to 3: instance 4 drained, not stranded
    cli_ok("scale", name, "4")
    out = cli_ok(*base, "--workers", "3", "--listen", f"127.0.0.1:{port}")
    assert "workers 4 -> 3 (scale)" in out
    now = instances()
    assert [i for i, (s, _) in now.items() if s == "active"] == ["1", "2", "3"]
    assert f"\n{name}: up to date (3 workers)" in cli_ok(*base, "--workers", "3", "--listen", f"127.0.0.1:{port}")

    # a new listen address needs the socket: refused without --force, nothing changed
    out = cli_error(*base, "--workers", "3", "--listen", f"127.0.0.1:{port2}")
    assert "--force" in out and "nothing was changed" in out
    assert get(port) == b"Hello, world!\n"
    assert json.loads(cli_ok("status", name, "--json"))["listen"] == [f"127.0.0.1:{port}"]
    out = cli_ok(*base, "--workers", "3", "--listen", f"127.0.0.1:{port2}", "--force")
    assert f"listen 127.0.0.1:{port} -> 127.0.0.1:{port2}" in out
    assert get(port2) == b"Hello, world!\n"
    with pytest.raises(OSError):
        get(port)

    # down removes all it made
    out = cli_ok("down", name)
    assert f"sandbox {box}: down" in out
    assert not sb.is_running(box)
    assert not (state / "units" / name).exists() and not (state / "clusters" / f"{name}.json").exists()
    with pytest.raises(OSError):
        get(port2)


CRASHES_UNDER_SYSTEMD = """
import os
if "INVOCATION_ID" in os.environ:  # set by systemd: the import check passes, the workers do not
    raise SystemExit("refusing to start: no database")
def app(environ, start_response):
    start_response("200 OK", [])
    return [b"never"]
"""


def test_failed_up_stops_its_workers_and_says_down(state: Path, tmp_path: Path) -> None:
    box = "crashbox"
    appdir = tmp_path / "crashy"  # under /tmp: bound into the sandbox, and back into the workers' private /tmp
    appdir.mkdir()
    (appdir / "crashy.py").write_text(CRASHES_UNDER_SYSTEMD)
    out = cli_error("up", "--app", "crashy:app", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
                    "--working-dir", str(appdir), "--user", "root", "--sandbox", "--sandbox-name", box, code=2)
    assert "not every instance came up" in out and "its workers are stopped" in out
    assert "clusterctl logs crashy -n 50" in out and "clusterctl down crashy" in out
    # nothing crash-loops meanwhile, and the journal says why
    states = {r["Id"]: r["ActiveState"] for r in sb.Sandbox(box).exec(
        ["systemctl", "show", "-p", "Id,ActiveState", "crashy@1.service", "crashy@2.service"]).stdout.split("\n\n")
        for r in [dict(ln.split("=", 1) for ln in r.strip().splitlines())] if r}
    assert all(s in ("inactive", "failed") for s in states.values()), states
    assert "no database" in cli_ok("logs", "crashy", "-n", "50")
    cli_ok("down", "crashy")
    assert not sb.is_running(box)


def test_two_apps_from_clusterctl_toml(state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["tomla", "tomlb"]
    ports = [free_port(), free_port()]
    user = user_args()
    project = tmp_path / "project"
    project.mkdir()
    (project / "clusterctl.toml").write_text("".join(
        f'[apps.{n}]\napp = "examples.hello:app"\nworking-dir = "{REPO}"\nworkers = {k + 1}\n'
        f'listen = ["127.0.0.1:{p}"]\nenv = {{ APP_NAME = "{n}" }}\n' + (f'user = "{user[1]}"\n' if user else "")
        for k, (n, p) in enumerate(zip(names, ports, strict=True))))
    monkeypatch.chdir(project)
    out = cli_ok("up")
    for n, p in zip(names, ports, strict=True):
        assert f"sandbox {n}: real systemd booted" in out
        assert get(p) == b"Hello, world!\n"
    assert f"from {project / 'clusterctl.toml'} [apps.{names[0]}]" in (
        state / "units" / names[0] / f"{names[0]}@.service").read_text().splitlines()[0]
    out = cli_ok("reload")
    assert f"{names[0]}: 1/1 instances on the new code" in out and f"{names[1]}: 2/2 instances" in out
    status = cli_ok("status")
    assert f"{names[0]}: 1 workers" in status and f"{names[1]}: 2 workers" in status
    out = cli_ok("down")
    assert all(f"sandbox {n}: down" in out for n in names)
    assert not any(sb.is_running(n) for n in names)


def test_stock_django_site_with_its_database_under_up(state: Path) -> None:
    """`django-admin startproject` + migrate, served by real systemd with the default hardening: generate warns
    that the workers cannot write db.sqlite3 and names the fix; with it the admin login works end to end."""
    pytest.importorskip("django")
    from tests.djangosite import admin_login, make_site

    site = Path(tempfile.mkdtemp(prefix="djsite-", dir=REPO.parent))  # outside /tmp, world-readable path
    try:
        site.chmod(0o755)
        make_site(site)
        warned = cli_ok("generate", "--app", "mysite.wsgi:application", "--working-dir", str(site),
                        "--output", str(state / "djunits"), "--no-verify")
        assert f"{site}/db.sqlite3 is an SQLite database" in warned and f"--rw-path {site}" in warned
        port = free_port()
        out = cli_ok("up", "--app", "mysite.wsgi:application", "--name", "djsite", "--working-dir", str(site),
                     "--listen", "127.0.0.1:8400", "--workers", "1", "--user", "root", "--rw-path", str(site),
                     "--sandbox", "--sandbox-name", "djbox", "--host-port", str(port))
        assert "SQLite" not in out  # the fix given: no warning
        (status, body, _), (status2, body2, location) = admin_login(f"http://127.0.0.1:{port}")
        assert status == 200 and "Please enter the correct username and password" in body, body[:2000]
        assert (status2, location) == (302, "/admin/"), body2[:2000]  # a session row written by the worker
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/signup/carol", timeout=10) as r:
            assert r.read() == b"users 2"
        cli_ok("down", "djsite")
    finally:
        shutil.rmtree(site, ignore_errors=True)
