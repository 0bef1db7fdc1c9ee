"""Shared fixtures: a real systemd booted in a clusterctl sandbox, and testinfra pointed at it.

* `sandbox` (session): a booted `clusterctl.control.sandbox.Sandbox` with the repo and the venv bound in
  read-only at the same paths (units can ExecStart `sys.executable`) and `sandbox_share`, a host dir
  bound read-write at the same path, for files both sides need (apps, configs, results).
* `sandbox_host` (session): a testinfra Host answering from inside `sandbox` (all namespaces, net too).
* `sandbox_factory` (session): `sandbox_factory("tag", binds=...)` boots more sandboxes.

Every sandbox is torn down at the end (fixture finalizer, and atexit as a second net); ones left by a
crashed earlier run (their owner pid is dead) are removed before the first boot. Tests using these
fixtures are marked `systemd` automatically. They skip only when the host cannot run a sandbox (not
root, no namespaces, no overlayfs), and fail instead when CLUSTERCTL_REQUIRE_SANDBOX=1 (CI sets it).
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import testinfra.host
from testinfra.backend.base import BaseBackend, CommandResult

from clusterctl.control import sandbox as sb
from clusterctl.errors import ClusterctlError
from tests.workerproc import Worker, spawner

REPO = Path(__file__).resolve().parent.parent
SANDBOX_FIXTURES = {"sandbox", "sandbox_host", "sandbox_factory", "sandbox_share"}


def _default_binds() -> list[sb.Bind]:
    """The repo and the interpreter the tests run with, at the same paths, read-only."""
    paths = {str(REPO), sys.prefix, sys.base_prefix}
    return [sb.Bind(p, p, readonly=True) for p in sorted(paths) if p not in ("/", "/usr", "/usr/local")]


def _owner_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _reap_orphans() -> None:
    """Remove test sandboxes whose pytest process died without tearing them down."""
    for info in sb.ls():
        if info.name.startswith("pytest-") and not _owner_alive(info.owner):
            sb.down(info.name, missing_ok=True)


class SandboxFactory:
    """Boots sandboxes named pytest-PID-TAG and stops all of them in `close()`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.reaped = False

    def reap_once(self) -> None:
        """Skip (or fail, under CLUSTERCTL_REQUIRE_SANDBOX=1) if this host cannot boot a sandbox; on the
        first call, remove sandboxes left by crashed runs."""
        try:
            sb.check_host()
        except ClusterctlError as e:
            if os.environ.get("CLUSTERCTL_REQUIRE_SANDBOX") == "1":
                pytest.fail(f"sandbox required but unavailable: {e}")
            pytest.skip(f"cannot boot a systemd sandbox here: {e}")
        if not self.reaped:
            _reap_orphans()
            self.reaped = True

    def __call__(self, tag: str, binds: Sequence[sb.Bind | tuple[str, str, bool] | str] | None = None,
                 **kwargs: Any) -> sb.Sandbox:
        self.reap_once()
        name = f"pytest-{os.getpid()}-{tag}"
        sb.down(name, missing_ok=True)  # a leftover of ours with the same name
        self.names.append(name)
        sb.up(name, _default_binds() if binds is None else binds, owner=os.getpid(), **kwargs)
        return sb.Sandbox(name)

    def close(self) -> None:
        errors = []
        while self.names:
            name = self.names.pop()
            try:
                sb.down(name, missing_ok=True)
            except ClusterctlError as e:
                errors.append(str(e))
        if errors:
            raise ClusterctlError("; ".join(errors))


@pytest.fixture(scope="session")
def sandbox_factory() -> Iterator[SandboxFactory]:
    factory = SandboxFactory()
    atexit.register(factory.close)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def sandbox_share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host directory bound read-write into `sandbox` at the same path."""
    return tmp_path_factory.mktemp("sandbox-share")


@pytest.fixture(scope="session")
def sandbox(sandbox_factory: SandboxFactory, sandbox_share: Path) -> sb.Sandbox:
    """The session's booted systemd (see the module docstring)."""
    return sandbox_factory("main", [*_default_binds(), sb.Bind(str(sandbox_share), str(sandbox_share))])


class SandboxBackend(BaseBackend):
    """testinfra backend running every command inside a sandbox (all its namespaces, network included)."""

    NAME = "clusterctl-sandbox"

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.sandbox = name
        super().__init__(name, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        argv = sb.exec_argv(self.sandbox, ["/bin/sh", "-c", self.get_command(command, *args)])
        return self.run_local(" ".join(["%s"] * len(argv)), *argv)


def testinfra_host(name: str) -> testinfra.host.Host:
    return testinfra.host.Host(SandboxBackend(name))


@pytest.fixture(scope="session")
def sandbox_host(sandbox: sb.Sandbox) -> testinfra.host.Host:
    return testinfra_host(sandbox.name)


@pytest.fixture(scope="session", autouse=True)
def private_clusterctl_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The records of where clusters run, and `up`'s units, in a tmp dir: tests never touch the user's
    ~/.local/state/clusterctl (tests that need their own set XDG_STATE_HOME again)."""
    state = tmp_path_factory.mktemp("xdg-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(state))
        yield state


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SANDBOX_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.systemd)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Worker processes under a stand-in service manager (tests/workerproc.py), killed afterwards."""
    with spawner(tmp_path) as start:
        yield start


@pytest.fixture(scope="session")
def default_binds() -> list[sb.Bind]:
    """What every test sandbox binds: the repo and the tests' interpreter, read-only."""
    return _default_binds()
