"""Worker processes for the tests, started the way systemd starts them: real fd passing
(systemd-socket-activate) and a real AF_UNIX notify socket that the test reads as the service manager
would. Shared by the runtime, ASGI, WebSocket and FastAPI tests (the `spawn` fixture in conftest)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SSA = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"


class Notify:
    """The service manager's side of NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def wait_for(self, needle: str, timeout: float = 10.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        for t, m in self.messages:
            if needle in m:
                return t, m
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append((time.monotonic(), data))
            if needle in data:
                return self.messages[-1]
        raise AssertionError(f"no {needle!r} within {timeout}s; got {[m for _, m in self.messages]}")

    def drain(self, seconds: float) -> list[str]:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                break
        return [m for _, m in self.messages]


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, notify: Notify | None) -> None:
        self.proc = proc
        self.port = port
        self.notify: Any = notify

    def request(self, path: str, timeout: float = 10.0, sock: socket.socket | None = None) -> bytes:
        s = sock or socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        with s:
            s.settimeout(timeout)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    def output(self) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=10)
        return out.decode(), err.decode()


def connect_when_listening(port: int, timeout: float = 5.0) -> socket.socket:
    """systemd-socket-activate starts the worker on the first connection: this makes that connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def assert_fails_before_ready(w: Worker, why: str) -> None:
    """A worker whose startup fails (e.g. ASGI lifespan): exits non-zero saying `why`, never READY=1."""
    s = connect_when_listening(w.port)  # systemd-socket-activate execs it on the first connection
    assert w.proc.wait(10) != 0
    s.close()
    _, err = w.output()
    assert why in err
    assert not any("READY=1" in m for m in w.notify.drain(0.2))


@contextlib.contextmanager
def spawner(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """start(*worker_args, ...) -> Worker; every process it started is killed by PID on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    n = [0]

    def start(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO, ssa: bool = True,
              notify: Notify | None = None) -> Worker:
        n[0] += 1
        notify = notify or Notify(tmp_path / f"notify{n[0]}")
        port = free_port()
        worker_env = {"NOTIFY_SOCKET": notify.path, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                      **(env or {})}
        cmd = [sys.executable, "-m", "clusterctl.worker", *args]
        if ssa:
            cmd = [SSA, "-l", f"127.0.0.1:{port}", *[f"-E{k}={v}" for k, v in worker_env.items()], *cmd]
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **worker_env})
        procs.append(proc)
        return Worker(proc, port, notify)

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(5)
