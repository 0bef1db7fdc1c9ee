"""Real apps from PyPI, unchanged, under the worker's default settings (no --threads): a stock Django project
with its SQLite database, Flask async views, asyncio.run() in a view, and streamed responses whose client
leaves. Each app is served by a real worker process (`python -m clusterctl.worker --bind`), asked by real
HTTP clients; gunicorn's sync worker serves all of these, and so must we.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.djangosite import admin_login, make_site
from tests.engine_thread import engines
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        _, err = self.proc.communicate(timeout=15)
        return err.decode()


@pytest.fixture(params=engines())
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[..., Served]]:
    """Workers on each engine: the Python protocol, and the compiled lane in front of it (issue 21)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(app: str, cwd: Path, *args: str) -> Served:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "clusterctl.worker", "--app", app, "--bind",
                                 f"127.0.0.1:{port}", "--no-access-log", "--engine", request.param, *args], cwd=cwd,
                                env={**os.environ, "PYTHONPATH": f"{cwd}:{REPO}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return Served(proc, port)
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"worker did not start: {proc.communicate()[1].decode()[-2000:]}") from None
                time.sleep(0.05)

    yield start
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(10)


# -- Django ----------------------------------------------------------------------------------------------------

@pytest.fixture
def django_site(tmp_path: Path) -> Path:
    """A fresh site (and database) per test: each engine's run signs its users up from scratch."""
    pytest.importorskip("django")
    site = tmp_path / "djangosite"
    site.mkdir()
    return make_site(site)


def test_django_admin_login_orm_writes_and_streaming(serve: Callable[..., Served], django_site: Path) -> None:
    s = serve("mysite.wsgi:application", django_site)
    (status, body, _), (status2, body2, location) = admin_login(s.base)
    assert status == 200, body[:2000]  # was 500 SynchronousOnlyOperation with the loop visible to the app
    assert "Please enter the correct username and password" in body
    assert (status2, location) == (302, "/admin/"), body2[:2000]
    assert s.get("/signup/alice") == (200, b"users 2")
    assert s.get("/signup/bob") == (200, b"users 3")
    assert s.get("/stream") == (200, b"admin\nalice\nbob\n")
    err = s.stop()
    assert s.proc.returncode == 0, err[-2000:]
    assert "SynchronousOnlyOperation" not in err


# -- Flask and plain WSGI --------------------------------------------------------------------------------------

FLASK_APP = '''
import asyncio
import time

from flask import Flask, Response

app = Flask(__name__)
closed = []


@app.get("/async")
async def async_view():
    await asyncio.sleep(0.01)
    return "async view"


@app.get("/asyncio-run")
def asyncio_run_view():
    async def answer():
        await asyncio.sleep(0.01)
        return 42
    return f"asyncio.run gave {asyncio.run(answer())}"


@app.get("/get-event-loop")
def get_event_loop_view():
    loop = asyncio.new_event_loop()
    try:
        return f"own loop gave {loop.run_until_complete(asyncio.sleep(0, 7))}"
    finally:
        loop.close()


@app.get("/stream")
def stream():
    def lines():
        try:
            for i in range(200):
                yield f"line {i}\\n"
                time.sleep(0.05)
        except GeneratorExit:
            closed.append(i)
            raise
    return Response(lines(), mimetype="text/plain")


@app.get("/closed")
def closed_view():
    return ",".join(map(str, closed))
'''


@pytest.fixture
def flask_dir(tmp_path: Path) -> Path:
    pytest.importorskip("flask")
    (tmp_path / "flaskapp.py").write_text(FLASK_APP)
    return tmp_path


def test_flask_async_view_and_asyncio_run_in_a_view(serve: Callable[..., Served], flask_dir: Path) -> None:
    s = serve("flaskapp:app", flask_dir)
    assert s.get("/async") == (200, b"async view")  # was 500: AsyncToSync in the loop's thread
    assert s.get("/asyncio-run") == (200, b"asyncio.run gave 42")  # was 500: a running event loop
    assert s.get("/get-event-loop") == (200, b"own loop gave 7")
    assert s.get("/async") == (200, b"async view")  # and again: nothing left behind by the first calls
    err = s.stop()
    assert s.proc.returncode == 0, err[-2000:]


def read_lines(sock: socket.socket, n: int) -> bytes:
    data = b""
    while data.count(b"line ") < n:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_streamed_response_is_flushed_and_closed_when_the_client_leaves(serve: Callable[..., Served],
                                                                         flask_dir: Path) -> None:
    s = serve("flaskapp:app", flask_dir)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
    t0 = time.monotonic()
    head = read_lines(sock, 4)
    assert time.monotonic() - t0 < 2, "each chunk goes out as the generator yields it, not at its end"
    assert b"transfer-encoding: chunked" in head.lower()
    sock.close()  # leave after line 4 of 200 (10 s of stream)
    t1 = time.monotonic()
    status, body = s.get("/closed", timeout=5)
    assert time.monotonic() - t1 < 1.0, "the next client waited for the abandoned stream"
    assert status == 200 and body, "GeneratorExit never reached the generator"
    assert int(body) < 12, f"the generator ran on to line {int(body)} after its client left"


SLOW_STREAM_APP = '''
import json
import time
closed = []

def app(environ, start_response):
    if environ["PATH_INFO"] == "/closed":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [json.dumps(closed).encode()]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Body()


class Body:
    """A plain iterable with close(), as PEP 3333 describes it (no generator)."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        if self.i > 100:
            raise StopIteration
        time.sleep(0.05)
        return b"x" * 1000

    def close(self):
        closed.append(self.i)
'''


def test_iterable_close_is_called_when_the_client_leaves(serve: Callable[..., Served], tmp_path: Path) -> None:
    (tmp_path / "slowstream.py").write_text(textwrap.dedent(SLOW_STREAM_APP))
    s = serve("slowstream:app", tmp_path)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    got = b""
    while len(got) < 3000:
        got += sock.recv(65536)
    sock.close()
    t1 = time.monotonic()
    status, body = s.get("/closed", timeout=5)
    assert time.monotonic() - t1 < 1.0
    closed = json.loads(body)
    assert status == 200 and len(closed) == 1 and closed[0] < 15, body
