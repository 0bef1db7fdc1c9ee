"""ASGI on our engine: a raw ASGI app over real sockets (same HTTP layer as WSGI), interface detection,
and Starlette apps run by the real worker under systemd-socket-activate with a real notify socket
(READY only after lifespan startup; a failing startup exits non-zero)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterctl.control.generate import worker_argv
from clusterctl.control.plan import build_plan
from clusterctl.errors import ClusterctlError
from clusterctl.http.asgi import AsgiServer, detect
from clusterctl.http.server import Limits
from tests.engine_thread import SMALL, EngineThread, Reader
from tests.workerproc import SSA, Worker, assert_fails_before_ready, connect_when_listening

seen: list[dict[str, Any]] = []
disconnects: list[str] = []


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    seen.append(scope)
    path = scope["path"]
    msg = await receive()
    if path == "/boom":
        raise RuntimeError("boom before start")
    if path == "/wait-disconnect":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        disconnects.append((await receive())["type"])
        return
    if path == "/midstream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("boom after start")
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"X-Kind", b"stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"chunk%d;" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path.startswith("/kind/"):  # same status, headers differing per path: compiled heads must not mix
        kind = path[6:].encode()
        cl = [(b"content-length", scope["query_string"])] if scope["query_string"] else []
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-kind", kind), *cl]})
        await send({"type": "http.response.body", "body": b"body-" + kind})
        return
    if path == "/slow":
        await asyncio.sleep(0.2)
    body = f"{scope['method']} {path} q={scope['query_string'].decode()} body={msg['body'].decode()}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class AsgiEngine(EngineThread):
    """AsgiServer on 127.0.0.1:<port> in a thread, like test_engine.Engine for WSGI."""

    def __init__(self, app: Any, limits: Limits = SMALL) -> None:

        def make(loop: asyncio.AbstractEventLoop) -> AsgiServer:
            server = AsgiServer(app, loop, limits)
            server.state["greeting"] = "hello"
            return server

        super().__init__(make)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=3)



@pytest.fixture
def asgi_engine() -> Iterator[AsgiEngine]:
    e = AsgiEngine(raw_app)
    yield e
    e.stop()


def ask(e: AsgiEngine, raw: bytes, n: int = 1, head: bool = False) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    with e.connect() as s:
        s.sendall(raw)
        r = Reader(s)
        out = [r.response(head=head) for _ in range(n)]
        s.settimeout(2)
        return out, r.closed()


def test_scope_is_spec_complete(asgi_engine: AsgiEngine) -> None:
    seen.clear()
    (res,), _ = ask(asgi_engine, b"POST /a%20b/%C3%A9?x=1&y=2 HTTP/1.1\r\nHost: h\r\nX-Custom: V\r\n"
                                 b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert res[0] == 200 and res[2] == "POST /a b/é q=x=1&y=2 body=hello".encode()
    scope = seen[-1]
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["http_version"] == "1.1" and scope["scheme"] == "http" and scope["root_path"] == ""
    assert scope["raw_path"] == b"/a%20b/%C3%A9" and scope["query_string"] == b"x=1&y=2"
    assert (b"x-custom", b"V") in scope["headers"] and (b"host", b"h") in scope["headers"]
    assert scope["client"][0] == "127.0.0.1" and scope["server"] == ("127.0.0.1", asgi_engine.port)
    assert scope["state"] == {"greeting": "hello"}


def test_streaming_is_chunked_and_head_has_no_body(asgi_engine: AsgiEngine) -> None:
    (res,), _ = ask(asgi_engine, b"GET /stream HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert res[1]["transfer-encoding"] == "chunked" and res[1]["x-kind"] == "stream"
    assert res[2] == b"chunk0;chunk1;chunk2;"
    (res,), closed = ask(asgi_engine, b"HEAD /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", head=True)
    assert res[0] == 200 and res[1]["content-length"] == str(len(b"HEAD /x q= body=")) and closed
    # 1.0 without Content-Length: delimited by close
    (res,), closed = ask(asgi_engine, b"GET /stream HTTP/1.0\r\n\r\n")
    assert res[2] == b"chunk0;chunk1;chunk2;" and closed


def test_response_heads_are_cached_per_headers_and_honour_the_apps_content_length(asgi_engine: AsgiEngine) -> None:
    # One keep-alive connection, the same status with alternating headers: each response keeps its own.
    raw = b"".join(b"GET /kind/%s HTTP/1.1\r\nHost: h\r\n\r\n" % k for k in (b"a", b"b", b"a", b"b", b"c"))
    res, _ = ask(asgi_engine, raw, n=5)
    assert [(r[1]["x-kind"], r[2]) for r in res] == [("a", b"body-a"), ("b", b"body-b"), ("a", b"body-a"),
                                                     ("b", b"body-b"), ("c", b"body-c")]
    # The app's own Content-Length, right: one header, connection kept; too short: truncated, then closed.
    (ok, short), closed = ask(asgi_engine, b"GET /kind/d?6 HTTP/1.1\r\nHost: h\r\n\r\n"
                                           b"GET /kind/e?3 HTTP/1.1\r\nHost: h\r\n\r\n", n=2)
    assert ok[2] == b"body-d" and ok[1]["content-length"] == "6" and "connection" not in ok[1]
    assert short[2] == b"bod" and closed
    # Connection: close gets the same head plus `connection: close`, cached apart from the kept variant.
    for close in (True, False, True):
        raw = b"GET /kind/f HTTP/1.1\r\nHost: h\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"
        (res,), _ = ask(asgi_engine, raw + (b"" if close else b"GET /kind/f HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
        assert res[2] == b"body-f" and res[1]["content-length"] == "6"
        assert (res[1].get("connection") == "close") == close, (close, res[1])


def test_pipelining_in_order_and_keepalive(asgi_engine: AsgiEngine) -> None:
    raw = (b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nGET /fast HTTP/1.1\r\nHost: h\r\n\r\n"
           b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
           b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    res, closed = ask(asgi_engine, raw, n=4)
    assert [r[2].split(b" q=")[0] for r in res] == [b"GET /slow", b"GET /fast", b"POST /p", b"GET /last"]
    assert res[2][2].endswith(b"body=hi") and closed


def test_app_errors_500_before_start_close_after(asgi_engine: AsgiEngine) -> None:
    res, _ = ask(asgi_engine, b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\nGET /after HTTP/1.1\r\nHost: h\r\n\r\n", n=2)
    assert [r[0] for r in res] == [500, 200]  # 500, and the connection stays usable
    with asgi_engine.connect() as s:
        s.sendall(b"GET /midstream HTTP/1.1\r\nHost: h\r\n\r\n")
        s.settimeout(3)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"part" in data and not data.endswith(b"0\r\n\r\n")
    (res,), _ = ask(asgi_engine, b"GET /alive HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert res[0] == 200  # the worker lives on


def _leave_mid_response(engine: AsgiEngine) -> None:
    """A client of /wait-disconnect reads the start of its response and leaves; the app hears it (3 s at most)."""
    disconnects.clear()
    s = engine.connect()
    s.sendall(b"GET /wait-disconnect HTTP/1.1\r\nHost: h\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    deadline = time.monotonic() + 3
    while not disconnects and time.monotonic() < deadline:
        time.sleep(0.02)


def test_disconnect_reaches_the_app(asgi_engine: AsgiEngine) -> None:
    _leave_mid_response(asgi_engine)
    assert disconnects == ["http.disconnect"]


def test_an_app_that_stops_when_its_client_left_is_not_an_error(asgi_engine: AsgiEngine,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A streaming app (SSE, Starlette's StreamingResponse) that returns on http.disconnect without finishing
    its response did what it should: no ERROR line, no error counted."""
    errors = asgi_engine.server.errors
    _leave_mid_response(asgi_engine)
    time.sleep(0.1)  # the app's task returns after its receive()
    assert disconnects == ["http.disconnect"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert asgi_engine.server.errors == errors
    (res,), _ = ask(asgi_engine, b"GET /alive HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert res[0] == 200


@pytest.mark.parametrize(("raw", "status"), [
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 20000\r\n\r\n", 413),
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(30)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
])
def test_same_limits_as_wsgi(asgi_engine: AsgiEngine, raw: bytes, status: int) -> None:
    (res,), closed = ask(asgi_engine, raw)
    assert res[0] == status and closed


def test_expect_100_continue(asgi_engine: AsgiEngine) -> None:
    with asgi_engine.connect() as s:
        s.sendall(b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"ok")
        st, _, body = Reader(s).response()
    assert st == 200 and body.endswith(b"body=ok")


# -- streamed request bodies and flow control ------------------------------------------------------------

uploads: list[list[tuple[int, bool]]] = []
release = asyncio.Event()


async def body_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Records each http.request as (body length, more_body), -1 for http.disconnect; answers the total."""
    if scope["path"] == "/reject":  # answers without reading the body
        await send({"type": "http.response.start", "status": 403, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})
        return
    if scope["path"] == "/held":  # reads one message, then waits until the test releases it
        first = await receive()
        await release.wait()
        msgs = [(len(first["body"]), first["more_body"])]
    else:
        msgs = []
    while not msgs or msgs[-1][1]:
        m = await receive()
        msgs.append((len(m["body"]), m["more_body"]) if m["type"] == "http.request" else (-1, False))
    uploads.append(msgs)
    if msgs[-1][0] != -1:
        total = sum(n for n, _ in msgs)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % total})


@pytest.fixture
def body_engine() -> Iterator[AsgiEngine]:
    uploads.clear()
    e = AsgiEngine(body_app, Limits(body_timeout=0.5, max_body_size=64 << 20))
    yield e
    e.stop()


def test_body_reaches_the_app_as_it_arrives(body_engine: AsgiEngine) -> None:
    with body_engine.connect() as s:
        s.sendall(b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.1)
        s.sendall(b"5\r\nworld\r\n")
        time.sleep(0.1)
        s.sendall(b"0\r\n\r\n")
        st, _, body = Reader(s).response()
        assert (st, body) == (200, b"10")
        # keep-alive after a streamed body: the next request is served on the same connection
        s.sendall(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        assert Reader(s).response()[2] == b"3"
    assert uploads[0][:2] == [(5, True), (5, True)] and uploads[0][-1][1] is False
    assert uploads[1][-1] == (3, False) or uploads[1][-2:] == [(3, True), (0, False)]


def test_expect_continue_only_when_the_app_reads(body_engine: AsgiEngine) -> None:
    with body_engine.connect() as s:
        s.sendall(b"POST /reject HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        r = Reader(s)
        st, _, body = r.response()
        assert (st, body) == (403, b"no")  # no "100 Continue" first: the client never has to send the body
        s.settimeout(2)
        assert r.closed()  # the unread body makes the connection unusable: closed, not read to discard
    with body_engine.connect() as s:
        s.sendall(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"12345")
        assert Reader(s).response()[2] == b"5"


def test_reading_stops_while_the_app_does_not_consume(body_engine: AsgiEngine) -> None:
    release.clear()
    size = 32 << 20
    s = body_engine.connect()
    s.sendall(b"POST /held HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"x" * (1 << 20)
    sent = 0
    s.settimeout(0.5)
    try:
        while sent < size:
            sent += s.send(block)
    except TimeoutError:
        pass
    # The engine stopped reading: the rest sits in the kernel's socket buffers, not in the worker.
    assert sent < size, "the whole body was accepted while the app read none of it"
    (conn,) = body_engine.server.connections  # type: ignore[attr-defined]
    assert conn.body_held and conn.inbox.size < 1 << 20
    time.sleep(0.7)  # longer than body_timeout: a paused read is the app's doing, never a slow client's
    assert not conn.closed
    body_engine.loop.call_soon_threadsafe(release.set)
    s.settimeout(10)
    while sent < size:
        sent += s.send(block[: size - sent])
    st, _, body = Reader(s).response()
    s.close()
    assert (st, body) == (200, b"%d" % size)
    assert len(uploads[0]) > 2 and all(more for _, more in uploads[0][:-1])


@pytest.mark.parametrize(("tail", "status"), [(b"zz\r\nxx\r\n", 400), (b"20\r\n" + b"y" * 32 + b"\r\n", 413)])
def test_broken_streamed_body_errors_and_the_app_hears_disconnect(tail: bytes, status: int) -> None:
    uploads.clear()
    e = AsgiEngine(body_app, Limits(max_body_size=16))
    try:
        _broken_body(e, tail, status)
        _heard_disconnect()
    finally:
        e.stop()


def _heard_disconnect() -> None:
    """The app's receive() wakes on a loop turn after the error response went out: wait for it (2 s at most)."""
    deadline = time.monotonic() + 2
    while uploads != [[(3, True), (-1, False)]] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert uploads == [[(3, True), (-1, False)]]


def _broken_body(e: AsgiEngine, tail: bytes, status: int) -> None:
    with e.connect() as s:
        s.sendall(b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        time.sleep(0.1)
        s.sendall(tail)
        r = Reader(s)
        assert r.response()[0] == status
        s.settimeout(2)
        assert r.closed()


def test_slow_streamed_body_times_out(body_engine: AsgiEngine) -> None:
    with body_engine.connect() as s:
        s.sendall(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
        r = Reader(s)
        assert r.response()[0] == 408
    _heard_disconnect()


SLOW_READER = """
import asyncio

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    total = 0
    while True:
        m = await receive()
        total += len(m.get("body", b""))
        if not m.get("more_body"):
            break
        await asyncio.sleep(0.0005)  # a slow consumer: the upload must wait for it, not pile up in memory
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%d" % total})
"""


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_100mb_upload_to_a_slow_reader_keeps_rss_bounded(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW_READER)
    size = 100 << 20
    w = spawn("--app", "slow:app", "--no-access-log", "--max-body-size", str(size), cwd=tmp_path)
    s = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    with s:
        s.settimeout(30)
        s.sendall(b"POST /up HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".replace(
            b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % size))
        before = _rss_kib(w.proc.pid, "VmRSS")
        block = b"u" * (1 << 20)
        for _ in range(size >> 20):
            s.sendall(block)
        st, _, body = Reader(s).response()
    assert (st, body) == (200, b"%d" % size)
    peak = _rss_kib(w.proc.pid, "VmHWM")
    assert peak - before < 24 << 10, f"worker RSS grew by {(peak - before) >> 10} MiB during a 100 MiB upload"


# -- interface detection ------------------------------------------------------------------------------------

def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    return []


class Asgi2:
    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        pass


class Asgi3Obj:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


def test_detect() -> None:
    assert detect(raw_app, "m:a")[0] == "asgi"
    assert detect(Asgi3Obj(), "m:a")[0] == "asgi"
    kind, adapted = detect(Asgi2, "m:a")
    assert kind == "asgi" and adapted is not Asgi2
    assert detect(wsgi_app, "m:a") == ("wsgi", wsgi_app)
    with pytest.raises(ClusterctlError, match="neither a WSGI app"):
        detect(lambda: None, "m:a")
    with pytest.raises(ClusterctlError, match="not WSGI"):
        detect(raw_app, "m:a", "wsgi")
    with pytest.raises(ClusterctlError, match="not an ASGI app"):
        detect(wsgi_app, "m:a", "asgi")


def test_generate_records_interface_only_when_not_auto() -> None:
    plan = build_plan(app="myapp:app", name="web", workers="2", check=False)
    assert "--interface" not in worker_argv(plan)
    plan = build_plan(app="myapp:app", name="web", workers="2", interface="asgi", check=False)
    assert worker_argv(plan)[-2:] == ["--interface", "asgi"]


# -- Starlette through the real worker ----------------------------------------------------------------------

STARLETTE_APP = '''
import asyncio, contextlib, os, time
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

@contextlib.asynccontextmanager
async def lifespan(app):
    await asyncio.sleep(float(os.environ.get("STARTUP_DELAY", "0")))
    if os.environ.get("FAIL_STARTUP"):
        raise RuntimeError("database unreachable")
    yield {"db": "connected"}
    with open(os.environ["SHUTDOWN_MARK"], "w") as f:
        f.write("shutdown ran")

async def data(request):
    return JSONResponse({"db": request.state.db, "q": request.query_params.get("q")})

async def echo(request):
    body = await request.body()
    return JSONResponse({"len": len(body), "head": body[:5].decode()})

async def stream(request):
    async def gen():
        for i in range(3):
            yield f"line {i}\\n"
            await asyncio.sleep(0.01)
    return StreamingResponse(gen(), media_type="text/plain")

app = Starlette(routes=[Route("/data", data), Route("/echo", echo, methods=["POST"]), Route("/stream", stream)],
                lifespan=lifespan)
'''


def test_starlette_served_with_lifespan(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    httpx = pytest.importorskip("httpx")
    (tmp_path / "sapp.py").write_text(STARLETTE_APP)
    mark = tmp_path / "shutdown"
    w = spawn("--app", "sapp:app", "--no-access-log", cwd=tmp_path,
              env={"STARTUP_DELAY": "0.6", "SHUTDOWN_MARK": str(mark)})
    first = connect_when_listening(w.port)
    t0 = time.monotonic()
    t_ready, _ = w.notify.wait_for("READY=1")
    assert t_ready - t0 >= 0.5, "READY=1 came before lifespan startup completed"
    first.close()
    base = f"http://127.0.0.1:{w.port}"
    with httpx.Client(base_url=base, timeout=5) as c:
        r = c.get("/data", params={"q": "x"})
        assert r.status_code == 200 and r.json() == {"db": "connected", "q": "x"}
        r = c.post("/echo", content=b"hello world" * 1000)
        assert r.json() == {"len": 11000, "head": "hello"}
        r = c.get("/stream")
        assert r.text == "line 0\nline 1\nline 2\n" and r.headers["transfer-encoding"] == "chunked"
        assert c.get("/missing").status_code == 404
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 0
    assert mark.read_text() == "shutdown ran"


def test_failing_startup_exits_nonzero(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    (tmp_path / "sapp.py").write_text(STARLETTE_APP)
    w = spawn("--app", "sapp:app", cwd=tmp_path, env={"FAIL_STARTUP": "1", "SHUTDOWN_MARK": str(tmp_path / "m")})
    assert_fails_before_ready(w, "database unreachable")


def test_app_without_lifespan_is_served(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text(
        "async def app(scope, receive, send):\n"
        "    assert scope['type'] == 'http'\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'no lifespan ok'})\n")
    w = spawn("--app", "plain:app", "--no-access-log", cwd=tmp_path)
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    assert w.request("/", sock=first).endswith(b"no lifespan ok")
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 0


assert SSA  # the worker tests are skipped (via the fixture module's marker) without systemd-socket-activate


def test_trailers_never_reach_the_scope(asgi_engine: AsgiEngine) -> None:
    """Streamed (the connection idle) and queued (behind a slow request) chunked requests alike: trailer fields
    are dropped, never merged into scope["headers"]."""
    seen.clear()
    chunked = (b"POST /t HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
               b"Authorization: Bearer smuggled\r\nHost: evil.example.com\r\n\r\n")
    out, _ = ask(asgi_engine, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n" + chunked + chunked, n=3)
    assert [r[0] for r in out] == [200, 200, 200] and out[1][2] == b"POST /t q= body=abc"
    for scope in seen[1:]:
        names = [n for n, _ in scope["headers"]]
        assert b"authorization" not in names and names.count(b"host") == 1, scope["headers"]
        assert (b"host", b"example.com") in scope["headers"]
