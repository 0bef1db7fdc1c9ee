"""Unit tests of clusterctl.worker.notify: bind address parsing, sd_notify datagrams, LISTEN_* handling."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clusterctl.errors import ClusterctlError
from clusterctl.worker import notify

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("addr", "family", "address"), [
    ("127.0.0.1:8000", socket.AF_INET, ("127.0.0.1", 8000)),
    (":8000", socket.AF_INET, ("0.0.0.0", 8000)),
    ("8000", socket.AF_INET, ("127.0.0.1", 8000)),
    ("[::1]:8080", socket.AF_INET6, ("::1", 8080)),
    ("unix:/run/app.sock", socket.AF_UNIX, "/run/app.sock"),
])
def test_parse_bind(addr: str, family: socket.AddressFamily, address: object) -> None:
    assert notify.parse_bind(addr) == (family, address)


@pytest.mark.parametrize("addr", ["host:port", "127.0.0.1:99999", "unix:", "[::1]8080"])
def test_parse_bind_rejects(addr: str) -> None:
    with pytest.raises(ClusterctlError):
        notify.parse_bind(addr)


def test_bind_tcp_and_port_in_use() -> None:
    sock = notify.bind("127.0.0.1:0")
    try:
        port = sock.getsockname()[1]
        assert notify.describe(sock) == f"127.0.0.1:{port}"
        with pytest.raises(ClusterctlError, match="cannot listen on"):
            notify.bind(f"127.0.0.1:{port}")
    finally:
        sock.close()


def test_bind_unix_replaces_stale_but_not_live(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # file left behind, nobody listening
    live = notify.bind(f"unix:{path}")
    try:
        assert notify.describe(live) == f"unix:{path}"
        with pytest.raises(ClusterctlError, match="in use"):
            notify.bind(f"unix:{path}")
    finally:
        live.close()


def test_notify_is_a_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify(ready=True, status="x") is False
    assert not notify.enabled()
    assert notify.watchdog_interval() is None


def test_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.notify(ready=True, status="serving\nnow")
        msg = srv.recv(4096).decode()
        assert msg.splitlines() == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=serving now"]
        assert notify.notify(watchdog=True, stopping=True)
        assert srv.recv(4096).decode().splitlines() == ["STOPPING=1", "WATCHDOG=1"]


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent")
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None  # armed for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 5.0


def test_listen_fds_ignores_other_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert notify.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert not notify.under_systemd()
    monkeypatch.setenv("INVOCATION_ID", "abc")
    assert notify.under_systemd()


@pytest.mark.parametrize("family", ["inet6", "unix"])
def test_listen_fds_takes_inherited_socket(family: str, tmp_path: Path) -> None:
    """In a child (fd 3 is ours there): family/type detected, CLOEXEC set, LISTEN_* unset."""
    if family == "unix":
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(str(tmp_path / "l.sock"))
    else:
        lsock = socket.socket(socket.AF_INET6)
        lsock.bind(("::1", 0))
    lsock.listen()
    code = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.environ['LISTEN_FDS'] = '1'; from clusterctl.worker import notify; s = notify.listen_fds(); "
        "print(len(s), s[0].family.name, s[0].type.name, os.get_inheritable(3), "
        "'LISTEN_FDS' in os.environ, notify.describe(s[0]).rsplit(':', 1)[0])"
    )
    with lsock:
        out = subprocess.run([sys.executable, "-c", code, str(lsock.fileno())], pass_fds=(lsock.fileno(),),
                             capture_output=True, text=True, cwd=REPO, timeout=20)
    assert out.returncode == 0, out.stderr
    fam = "AF_UNIX" if family == "unix" else "AF_INET6"
    prefix = "unix" if family == "unix" else "[::1]"
    assert out.stdout.split() == ["1", fam, "SOCK_STREAM", "False", "False", prefix]
