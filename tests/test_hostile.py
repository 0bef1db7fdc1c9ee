"""Hostile clients against one real worker process (`python -m clusterctl.worker --bind`, default limits):
slow clients must not lock others out, and stalled uploads or non-reading clients must not blow up its memory.

Slower than the engine tests (about 40 s in all), bounded in time, loopback only; `pytest -m hostile` runs
just these. Figures are in bench/RESULTS.md ("Hostile clients").
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.hostile

APP = '''
BIG = b"b" * (10 * 1024 * 1024)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [BIG]
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
'''


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    def get(self, path: str = "/", timeout: float = 1.0) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            line = s.recv(64)
        return int(line.split(b" ")[1]) if line.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 6000:
        pytest.skip(f"needs 6000 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 6000), hard))  # the worker inherits it
    (tmp_path / "hostile_app.py").write_text(APP)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clusterctl.worker", "--app", "hostile_app:app", "--bind",
                             f"127.0.0.1:{port}", "--no-access-log"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    w = Worker(proc, port)
    deadline = time.monotonic() + 20
    while True:
        try:
            if w.get() == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "worker did not start"
        time.sleep(0.05)
    yield w
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_trickling_uploads_do_not_lock_out_normal_requests(worker: Worker) -> None:
    """2,100 clients (more than --max-connections 2048) each trickle an upload, reconnecting when cut; normal
    requests alongside are answered, nearly all within a second."""
    head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
    socks: list[socket.socket | None] = [None] * 2100
    stop = threading.Event()

    def connect() -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", worker.port), timeout=2)
            s.setblocking(False)
            s.send(head)
            return s
        except OSError:
            return None

    for i in range(len(socks)):
        socks[i] = connect()

    def trickle() -> None:  # one body byte per client every ~5 s; a client that was cut reconnects (<= 100/s)
        i = 0
        while not stop.is_set():
            s = socks[i]
            try:
                if s is None:
                    raise OSError
                s.send(b"x")
            except OSError:
                if s is not None:
                    s.close()
                socks[i] = connect()
                time.sleep(0.01)
            i = (i + 1) % len(socks)
            time.sleep(5 / len(socks))

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        time.sleep(2)  # every slot is taken by now
        fast = 0
        for _ in range(101):
            t0 = time.monotonic()
            with contextlib.suppress(OSError):
                if worker.get(timeout=1.0) == 200 and time.monotonic() - t0 < 1.0:
                    fast += 1
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(10)
        for s in socks:
            if s is not None:
                s.close()
    assert fast >= 96, f"only {fast} of 101 normal requests answered within 1 s"
    assert worker.proc.poll() is None


def test_stalled_uploads_and_non_reading_clients_keep_memory_bounded(worker: Worker) -> None:
    """50 uploads of 15 MiB that stall at the end hold at most --max-buffered (128 MiB) between them, the rest
    get 503; 20 clients that never read a 10 MB response share the app's one body instead of a copy each."""
    base = rss_mib(worker.proc.pid)
    uploads = []
    chunk = b"u" * (1024 * 1024)
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", worker.port), timeout=5)
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 16000000\r\n\r\n")
        try:
            for _ in range(15):
                s.sendall(chunk)
        except OSError:
            pass  # answered 503 and closed: over --max-buffered
        uploads.append(s)
    time.sleep(0.5)
    stalled = rss_mib(worker.proc.pid)
    readers = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", worker.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        readers.append(s)
    time.sleep(1.0)
    not_reading = rss_mib(worker.proc.pid)
    for s in uploads + readers:
        s.close()
    print(f"worker RSS: {base:.0f} MiB at start, {stalled:.0f} with 50 stalled uploads, "
          f"{not_reading:.0f} with 20 non-reading clients of a 10 MB response")
    assert stalled - base < 128 + 48, (base, stalled)
    assert not_reading - stalled < 48, (stalled, not_reading)
    assert worker.get() == 200
