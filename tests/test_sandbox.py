"""The sandbox: real systemd as PID 1 of isolated namespaces, and the host untouched by anything inside."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.cli import cli
from clusterctl.control import forwarder
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from clusterctl.errors import ClusterctlError

HTTP_PORT = 8123
CAP_SYS_MODULE = 16


def _systemctl(box: sb.Sandbox, *args: str, check: bool = True) -> str:
    return Systemd(sandbox=box.name).systemctl(*args, check=check).stdout


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _http_get(sock: socket.socket, path: str) -> bytes:
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def _wait_listening(box: sb.Sandbox, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            box.connect(port, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _install_http_unit(box: sb.Sandbox, unit: str, port: int, directory: str) -> None:
    """An installed unit (file in the overlay's /etc) serving `directory` with the test venv's python."""
    text = (f"[Unit]\nDescription=sandbox test http\n[Service]\n"
            f"ExecStart={sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {directory}\n"
            f"[Install]\nWantedBy=multi-user.target\n")
    box.exec(["tee", f"/etc/systemd/system/{unit}"], input=text)
    _systemctl(box, "daemon-reload")
    _systemctl(box, "enable", "--now", unit)
    _wait_listening(box, port)


@pytest.fixture(scope="module")
def http_unit(sandbox: sb.Sandbox, sandbox_share: Path) -> str:
    (sandbox_share / "hello.txt").write_text("hello from the sandbox\n")
    _install_http_unit(sandbox, "sbtest-http.service", HTTP_PORT, str(sandbox_share))
    return "sbtest-http.service"


# ------------------------------------------------------------------------------------- isolation


def test_host_files_never_change(sandbox_factory) -> None:
    tag = uuid.uuid4().hex[:12]
    tmp_canary = Path(f"/tmp/clusterctl-canary-{tag}")
    etc_canary = Path(f"/etc/clusterctl-canary-{tag}")
    inside_only = Path(f"/etc/clusterctl-inside-{tag}")
    tmp_canary.write_bytes(os.urandom(64))
    etc_canary.write_bytes(os.urandom(64))
    before = {p: _digest(p) for p in (tmp_canary, etc_canary)}
    try:
        box = sandbox_factory("iso", binds=[])
        # the overlay shows the host's files, and the isolation is in place before anything hostile runs
        assert box.exec(["sh", "-c", f"test -f {etc_canary}"], check=False).returncode == 0
        assert box.exec(["findmnt", "-no", "FSTYPE", "/"]).stdout.strip() == "overlay"
        assert box.exec(["findmnt", "-no", "FSTYPE", "/tmp"]).stdout.strip() == "tmpfs"
        assert box.exec(["sh", "-c", f"test -e {tmp_canary}"], check=False).returncode != 0
        hostile = (f"rm -rf /tmp/* /tmp/.[!.]*; echo evil > {etc_canary}; echo inside > {inside_only}; "
                   "echo 100 > /proc/sys/vm/swappiness; exit 0")
        box.exec(["bash", "-c", hostile])
        assert box.exec(["cat", str(inside_only)]).stdout == "inside\n"
        assert box.exec(["cat", str(etc_canary)]).stdout == "evil\n"
        assert "Read-only" in box.exec(["sh", "-c", "echo 1 > /proc/sys/vm/swappiness"], check=False).stderr
        assert {p: _digest(p) for p in before} == before
        assert not inside_only.exists()
        assert tmp_canary.exists()
        box.down()
        assert {p: _digest(p) for p in before} == before
        assert not inside_only.exists()
    finally:
        tmp_canary.unlink(missing_ok=True)
        etc_canary.unlink(missing_ok=True)


def test_capabilities_are_bounded(sandbox: sb.Sandbox) -> None:
    status = sandbox.exec(["grep", "CapBnd", "/proc/self/status", "/proc/1/status"]).stdout
    masks = [int(line.split()[-1], 16) for line in status.splitlines()]
    assert len(masks) == 2
    assert all(not m & (1 << CAP_SYS_MODULE) for m in masks)


# --------------------------------------------------------------------------------------- systemd


def test_systemd_is_pid1_and_systemctl_works(sandbox: sb.Sandbox) -> None:
    assert sandbox.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert _systemctl(sandbox, "is-system-running", check=False).strip() in ("running", "degraded")
    assert _systemctl(sandbox, "is-active", "systemd-journald.service").strip() == "active"
    assert _systemctl(sandbox, "is-enabled", "systemd-sysctl.service", check=False).strip() == "masked"
    assert sandbox.exec(["hostname"]).stdout.strip() == f"sandbox-{sandbox.name}"


def test_installed_unit_serves_from_bound_venv(sandbox: sb.Sandbox, http_unit: str) -> None:
    assert _systemctl(sandbox, "is-active", http_unit).strip() == "active"
    # from the test process: one thread in the sandbox's network namespace
    assert _http_get(sandbox.connect(HTTP_PORT), "/hello.txt").endswith(b"hello from the sandbox\n")
    # a host program (the load-generator pattern) in the sandbox's network namespace only
    client = ("import urllib.request,sys; "
              f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT}/hello.txt').read().decode())")
    assert sandbox.netexec([sys.executable, "-c", client]).stdout == "hello from the sandbox\n"


def test_transient_unit_and_journal(sandbox: sb.Sandbox) -> None:
    # systemd-run talks to PID 1 over its private socket; --wait would need dbus (up(with_dbus=True))
    sandbox.exec(["systemd-run", "--unit=sbtest-transient", "--", "sh", "-c", "echo transient-ran"])
    journal = ["journalctl", "-u", "sbtest-transient", "-o", "cat"]
    deadline = time.monotonic() + 5
    while "transient-ran" not in (log := sandbox.exec(journal).stdout):
        assert time.monotonic() < deadline, log
        time.sleep(0.1)


def test_testinfra_host(sandbox_host, http_unit: str, sandbox_share: Path) -> None:
    service = sandbox_host.service(http_unit)
    assert service.is_running
    assert service.is_enabled
    assert sandbox_host.socket(f"tcp://127.0.0.1:{HTTP_PORT}").is_listening
    unit_file = sandbox_host.file(f"/etc/systemd/system/{http_unit}")
    assert unit_file.exists and unit_file.mode == 0o644
    assert sandbox_host.file(str(sandbox_share / "hello.txt")).contains("hello from the sandbox")
    assert sandbox_host.check_output("hostname").startswith("sandbox-")


def test_forward_exposes_port_on_host(sandbox: sb.Sandbox, http_unit: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    fpid = forwarder.forward(sandbox.name, host_port, HTTP_PORT)
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", host_port), timeout=5)
            assert _http_get(sock, "/hello.txt").endswith(b"hello from the sandbox\n")
    finally:
        forwarder.unforward(sandbox.name, host_port)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{fpid}").exists() and b"clusterctl" in Path(f"/proc/{fpid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ----------------------------------------------------------------------- several, and tear-down


def _ns_members(pid_ns: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pid_ns:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def test_two_sandboxes_same_port_then_down_leaves_nothing(sandbox_factory) -> None:
    boxes = [sandbox_factory("twin-a"), sandbox_factory("twin-b")]
    for box in boxes:
        box.exec(["sh", "-c", f"mkdir -p /srv/www && echo {box.name} > /srv/www/who.txt"])
        _install_http_unit(box, "sbtest-twin.service", 8200, "/srv/www")
    for box in boxes:
        assert _http_get(box.connect(8200), "/who.txt").endswith(f"{box.name}\n".encode())

    box = boxes[0]
    pid1 = box.pid
    pid_ns = os.readlink(f"/proc/{pid1}/ns/pid")
    assert len(_ns_members(pid_ns)) >= 3  # systemd, journald, the http unit
    state = sb.state_dir(box.name)
    box.down()
    assert _ns_members(pid_ns) == []
    assert not state.exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/clusterctl-sandbox.{box.name}"))
    assert not list(Path("/sys/fs/cgroup").glob(f"clusterctl-sandbox.{box.name}"))
    assert box.name not in [i.name for i in sb.ls()]
    # the other one is unaffected
    assert _http_get(boxes[1].connect(8200), "/who.txt").endswith(f"{boxes[1].name}\n".encode())


def test_host_network_option(sandbox_factory) -> None:
    box = sandbox_factory("hostnet", net="host")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    box.exec(["sh", "-c", "mkdir -p /srv/www && echo hostnet > /srv/www/who.txt"])
    _install_http_unit(box, "sbtest-hostnet.service", port, "/srv/www")
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)  # straight from the host
    assert _http_get(sock, "/who.txt").endswith(b"hostnet\n")
    box.down()


def test_boot_failure_reports_console_and_keeps_state(sandbox_factory) -> None:
    sandbox_factory.reap_once()
    name = f"pytest-{os.getpid()}-fail"
    try:
        with pytest.raises(ClusterctlError, match="did not boot") as err:
            sb.up(name, timeout=0.05, owner=os.getpid())
        assert "console.log" in str(err.value) and "timeout" in (err.value.fix or "")
        assert (sb.state_dir(name) / "masked.txt").exists()  # kept for inspection
        assert not sb.is_running(name)
    finally:
        sb.down(name, missing_ok=True)
    assert not sb.state_dir(name).exists()


# ---------------------------------------------------------------------------------- error paths


@pytest.fixture
def empty_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLUSTERCTL_SANDBOX_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", ["", "a/b", "../x", "..", ".x", "a b", "x" * 65, "é"])
def test_bad_names_are_refused(empty_base: Path, name: str) -> None:
    with pytest.raises(ClusterctlError, match="bad sandbox name"):
        sb.up(name)


def test_unknown_sandbox(empty_base: Path) -> None:
    for call in (lambda: sb.pid("nosuch"), lambda: sb.exec("nosuch", ["true"]), lambda: sb.down("nosuch")):
        with pytest.raises(ClusterctlError, match="'nosuch' does not exist") as err:
            call()
        assert err.value.fix
    sb.down("nosuch", missing_ok=True)
    assert sb.ls() == []


def test_not_root(empty_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterctlError, match="needs root") as err:
        sb.up("x")
    assert "root" in (err.value.fix or "")
    assert not (empty_base / "x").exists()


def test_namespaces_unavailable(empty_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(sb, "NAMESPACES", (*sb.NAMESPACES, "nosuchns"))
    with pytest.raises(ClusterctlError, match="lacks nosuchns namespaces"):
        sb.up("x")


def test_bad_binds_and_units(empty_base: Path) -> None:
    with pytest.raises(ClusterctlError, match="does not exist"):
        sb.up("x", ["/nonexistent/path:/x"])
    with pytest.raises(ClusterctlError, match="bad bind destination"):
        sb.up("x", [("/etc", "relative", True)])
    with pytest.raises(ClusterctlError, match="bad unit name"):
        sb.up("x", wants=["foo;rm"])
    assert sb.Bind.parse("/etc:/mnt/etc:ro") == sb.Bind("/etc", "/mnt/etc", True)
    assert sb.Bind.parse("/etc") == sb.Bind("/etc", "/etc", False)


def test_cli_errors_are_one_line(empty_base: Path) -> None:
    result = CliRunner().invoke(cli, ["sandbox", "exec", "nosuch", "true"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: sandbox 'nosuch' does not exist (fix: ")
    result = CliRunner().invoke(cli, ["sandbox", "up", "--name", "a/b"])
    assert result.exit_code == 2 and "bad sandbox name" in result.output


def test_cli_up_exec_ls_down(sandbox_factory) -> None:
    sandbox_factory.reap_once()
    name = f"pytest-{os.getpid()}-cli"
    runner = CliRunner()
    try:
        result = runner.invoke(cli, ["sandbox", "up", "--name", name, "--timeout", "30"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"sandbox {name}: up in ") and "(pid " in result.output
        assert runner.invoke(cli, ["sandbox", "exec", name, "--", "sh", "-c", "exit 3"]).exit_code == 3
        assert runner.invoke(cli, ["sandbox", "exec", name, "systemctl", "is-active", "-q",
                                   "systemd-journald"]).exit_code == 0
        assert f"{name}\trunning pid {sb.pid(name)}" in runner.invoke(cli, ["sandbox", "ls"]).output
        result = runner.invoke(cli, ["sandbox", "up", "--name", name])
        assert result.exit_code == 2 and "already running" in result.output
        assert runner.invoke(cli, ["sandbox", "down", name]).exit_code == 0
        assert name not in runner.invoke(cli, ["sandbox", "ls"]).output
    finally:
        sb.down(name, missing_ok=True)


def test_a_dotted_cluster_name_is_a_sandbox_name() -> None:
    """`clusterctl up --name my.app` names its sandbox after the cluster: the two rules are one."""
    from clusterctl.control.plan import parse_name

    assert sb.check_name(parse_name("my.app")) == "my.app"
