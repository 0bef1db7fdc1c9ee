"""The hardened default units in a real systemd: they serve, log and notify under the sandboxing, and
`systemd-analyze security` scores them at most 2.0 (the stock gunicorn sample unit is scored beside it)."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.cli import cli
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from tests.clusters import EXPOSURE_BOUND, exposure, install, installed, uninstall
from tests.loadgen import request
from tests.worker_user import share_app, worker_user

REPO = Path(__file__).resolve().parent.parent
PORT = 8300


@pytest.fixture(scope="module")
def hardened(sandbox: sb.Sandbox, tmp_path_factory: pytest.TempPathFactory):
    sd = Systemd(sandbox=sandbox.name)
    with installed(sd, tmp_path_factory.mktemp("hard") / "hard", app="examples.hello:app", name="hard", workers="2",
                   listen=[f"127.0.0.1:{PORT}"], working_dir=str(REPO), python=sys.executable, user=worker_user()):
        yield sd


def test_hardened_cluster_serves_logs_and_notifies(sandbox: sb.Sandbox, hardened: Systemd) -> None:
    with sb.netns(sandbox.name):
        assert request(PORT, "/") == (200, b"Hello, world!\n")
        status, body = request(PORT, "/pid")
    assert status == 200
    rows = hardened.show(["hard@1.service", "hard@2.service"], ("ActiveState", "SubState", "StatusText"))
    assert [r["ActiveState"] for r in rows] == ["active", "active"]  # READY=1 got through (Type=notify)
    props = hardened.show(["hard@1.service"], ("DynamicUser", "ProtectSystem", "NoNewPrivileges", "User"))[0]
    assert props["ProtectSystem"] == "strict" and props["NoNewPrivileges"] == "yes"
    assert props["DynamicUser"] == ("yes" if worker_user() is None else "no")
    pid = body.split()[0].decode()
    uid = re.search(r"^Uid:\s+(\d+)", hardened.path(f"/proc/{pid}/status").read_text(), re.M)
    assert uid and (uid.group(1) != "0") == (worker_user() is None)
    journal = hardened.journalctl("-u", "hard@1.service", "-o", "cat")
    assert f"serving examples.hello:app on 127.0.0.1:{PORT}" in journal, journal[-2000:]  # the worker's own line


def test_default_units_exposure_at_most_2(sandbox: sb.Sandbox, tmp_path: Path) -> None:
    """Scored on installed units, the defaults (DynamicUser, no --user); the gunicorn sample for comparison."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 to name in ExecStart")
    sd = Systemd(sandbox=sandbox.name)
    install(sd, tmp_path / "score", start=False, app="examples.hello:app", name="score", workers="1",
            listen=["127.0.0.1:8399"], working_dir="/srv" if Path("/srv").is_dir() else str(REPO),
            python="/usr/bin/python3", check=False)
    shutil.copy(REPO / "tests/data/gunicorn-sample.service", sd.path("/etc/systemd/system/gunicorn-sample.service"))
    try:
        sd.systemctl("daemon-reload")
        ours, theirs = exposure(sandbox, "score@1.service"), exposure(sandbox, "gunicorn-sample.service")
        print(f"\nexposure: clusterctl default units {ours}, gunicorn sample unit {theirs}")
        assert ours <= EXPOSURE_BOUND, f"score@1.service exposure {ours} > {EXPOSURE_BOUND}"
        assert theirs > ours
    finally:
        sd.path("/etc/systemd/system/gunicorn-sample.service").unlink(missing_ok=True)
        uninstall(sd, "score")


# --- MemoryDenyWriteExecute=yes and foreign-function callbacks ----------------------------------------------

WX_PORT = 8310
CALLBACK_APP = '''
import ctypes
import os

CB = os.environ.get("CB", "ctypes")  # the unit sets it; generate's import check runs without it
if CB == "cffi":  # ABI mode: the callback's trampoline is written at run time (W+X memory)
    import cffi

    ffi = cffi.FFI()
    double = ffi.callback("int(int)", lambda x: x * 2)
else:  # ctypes: libffi's closures (static trampolines in Debian 12's libffi 3.4) need no W+X memory
    double = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x * 2)


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%s %d\\n" % (CB.encode(), double(21))]
'''


def install_callback_app(sandbox: sb.Sandbox, share: Path, out: Path, cb: str, *, allow_wx: bool) -> Systemd:
    appdir = share_app(share, "cbapp", CALLBACK_APP)
    sd = Systemd(sandbox=sandbox.name)
    install(sd, out, start=False, force=True, app="cbapp:app", name="wx", workers="1", listen=[f"127.0.0.1:{WX_PORT}"],
            working_dir=str(appdir), python=sys.executable, user=worker_user(appdir), env=[f"CB={cb}"], allow_wx=allow_wx)
    sd.systemctl("restart", "wx@1.service", check=False, timeout=60)
    return sd


@pytest.fixture
def wx_cluster(sandbox: sb.Sandbox) -> Iterator[None]:
    yield
    sd = Systemd(sandbox=sandbox.name)
    if sd.path("/etc/systemd/system/wx.target").exists():
        uninstall(sd, "wx")


def test_cffi_callback_needs_allow_wx_and_status_says_so(sandbox: sb.Sandbox, sandbox_share: Path, tmp_path: Path,
                                                         wx_cluster: None) -> None:
    """cffi's ABI-mode ffi.callback() (cffi 2.x here) mmaps writable+executable memory: under the default
    MemoryDenyWriteExecute=yes the import fails, and the journal and `clusterctl status` name --allow-wx."""
    pytest.importorskip("cffi")
    sd = install_callback_app(sandbox, sandbox_share, tmp_path / "wx", "cffi", allow_wx=False)
    assert sd.show(["wx@1.service"], ("MemoryDenyWriteExecute",))[0]["MemoryDenyWriteExecute"] == "yes"
    assert sd.show(["wx@1.service"], ("ActiveState",))[0]["ActiveState"] != "active"
    journal = sd.journalctl("-u", "wx@1.service", "-o", "cat")
    assert "Cannot allocate write+execute memory for ffi.callback()" in journal, journal[-2000:]
    assert "--allow-wx" in journal
    result = CliRunner().invoke(cli, ["status", "wx", "--sandbox", sandbox.name])
    line = next((ln for ln in result.output.splitlines() if ln.startswith("instance 1 is ")), "")
    assert "write+execute" in line and "--allow-wx" in line, result.output

    sd = install_callback_app(sandbox, sandbox_share, tmp_path / "wx", "cffi", allow_wx=True)
    assert sd.show(["wx@1.service"], ("MemoryDenyWriteExecute", "ActiveState")) == [
        {"MemoryDenyWriteExecute": "no", "ActiveState": "active"}]
    with sb.netns(sandbox.name):
        assert request(WX_PORT, "/") == (200, b"cffi 42\n")


def test_ctypes_callback_runs_under_the_default_units(sandbox: sb.Sandbox, sandbox_share: Path, tmp_path: Path,
                                                      wx_cluster: None) -> None:
    sd = install_callback_app(sandbox, sandbox_share, tmp_path / "wx", "ctypes", allow_wx=False)
    assert sd.show(["wx@1.service"], ("MemoryDenyWriteExecute", "ActiveState")) == [
        {"MemoryDenyWriteExecute": "yes", "ActiveState": "active"}]
    with sb.netns(sandbox.name):
        assert request(WX_PORT, "/") == (200, b"ctypes 42\n")
