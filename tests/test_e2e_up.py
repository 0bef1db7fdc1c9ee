"""`clusterctl up` / `down`, the README's main job: generate, boot a sandbox, install, start, forward."""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest
from click.testing import CliRunner

from clusterctl import sandbox as sb
from clusterctl.cli import cli
from tests.worker_user import user_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
