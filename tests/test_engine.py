"""The HTTP engine over real sockets: a corpus of valid and hostile requests, WSGI semantics, limits.

Each test runs the engine on uvloop in a background thread with small limits and timeouts, talks to it
with raw bytes, and asserts the exact status (or a close), then that the server still answers.
"""

from __future__ import annotations

import io
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest

from clusterctl.http import fastlane
from clusterctl.http.server import Limits
from clusterctl.http.wsgi import WsgiServer
from tests.engine_thread import SMALL, EngineThread, Reader, engines

pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")



class Engine(EngineThread):
    """An engine serving `app` on 127.0.0.1:<port> from a thread; records the paths the app saw."""

    def __init__(self, app: Callable[..., Any], limits: Limits = SMALL, threads: int = 0,
                 validate: bool = True, compiled: bool = False) -> None:
        self.seen: list[str] = []
        self.errors_logged = 0

        def recording(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            self.seen.append(environ["PATH_INFO"])
            return app(environ, start_response)

        self.app = validator(recording) if validate else recording
        self.limits = limits
        self.threads = threads
        super().__init__(lambda loop: self.server_for(loop, compiled))

    def server_for(self, loop: Any, compiled: bool) -> WsgiServer:
        server = WsgiServer(self.app, loop, self.limits, threads=self.threads)
        if compiled:  # the C fast lane where it applies (not with threads), the Python protocol behind it
            fastlane.install(server)
        return server


    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=3)
        return s


@pytest.fixture(params=engines())
def engine(request: pytest.FixtureRequest) -> Iterator[Callable[..., Engine]]:
    started: list[Engine] = []

    def start(app: Callable[..., Any] | None = None, **kw: Any) -> Engine:
        e = Engine(app or echo_app, compiled=request.param == "compiled", **kw)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


# -- apps -----------------------------------------------------------------------------------------------

def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    info = (f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} q={environ['QUERY_STRING']} "
            f"cl={environ.get('CONTENT_LENGTH', '')} x={environ.get('HTTP_X_A', '')} "
            f"proto={environ['SERVER_PROTOCOL']}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [info + body]


def exchange(e: Engine, data: bytes, n: int = 1, head: bool = False) -> tuple[list[int], list[bytes], bool]:
    """Send raw bytes, read n responses, then report whether the server closed the connection."""
    with e.connect() as s:
        s.sendall(data)
        r = Reader(s)
        statuses, bodies = [], []
        for _ in range(n):
            st, _, body = r.response(head=head)
            statuses.append(st)
            bodies.append(body)
        s.settimeout(2)
        closed = r.closed()
    return statuses, bodies, closed


def still_serves(e: Engine) -> None:
    st, bodies, _ = exchange(e, b"GET /alive HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert st == [200] and bodies[0].startswith(b"GET /alive")


# -- valid requests ------------------------------------------------------------------------------------

VALID = [
    (b"GET /p?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /p q=x=1 cl= x= proto=HTTP/1.1"),
    (b"GET /a%20b HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /a b q="),
    (b"GET http://example.com/abs?q HTTP/1.1\r\nHost: example.com\r\n\r\n", b"GET /abs q=q"),
    (b"GET /v10 HTTP/1.0\r\n\r\n", b"GET /v10 q= cl= x= proto=HTTP/1.0"),
    (b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", b"POST /cl q= cl=5 x= proto=HTTP/1.1\nhello"),
    (b"POST /ch HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
     b"POST /ch q= cl=5 x= proto=HTTP/1.1\nabcde"),
    (b"GET /m HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n", b"GET /m q= cl= x=1,2"),
    (b"GET /u HTTP/1.1\r\nHost: a\r\nX_A: spoof\r\n\r\n", b"GET /u q= cl= x= "),
    (b"OPTIONS /o HTTP/1.1\r\nHost: a\r\n\r\n", b"OPTIONS /o"),
]


@pytest.mark.parametrize(("raw", "expect"), VALID, ids=[v[0][:24].decode() for v in VALID])
def test_valid_requests(engine: Callable[..., Engine], raw: bytes, expect: bytes) -> None:
    e = engine()
    st, bodies, _ = exchange(e, raw)
    assert st == [200]
    assert bodies[0].startswith(expect), bodies[0]


def test_http10_keepalive_and_default_close(engine: Callable[..., Engine]) -> None:
    e = engine(validate=False)  # the validator hides the body length; 1.0 keep-alive needs it
    with e.connect() as s:
        s.sendall(b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r = Reader(s)
        st, h, _ = r.response()
        assert st == 200 and h["connection"] == "keep-alive"
        s.sendall(b"GET /2 HTTP/1.0\r\n\r\n")
        st, h, _ = r.response()
        assert st == 200 and h["connection"] == "close"
        assert r.closed()


def test_pipelining_answers_in_order(engine: Callable[..., Engine]) -> None:
    e = engine()
    reqs = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(40))
    st, bodies, _ = exchange(e, reqs + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", n=41)
    assert st == [200] * 41
    assert [b.split()[1] for b in bodies] == [b"/%d" % i for i in range(40)] + [b"/last"]


# -- malformed requests: 400 (or the exact status) and close, never a request after it ------------------------

MALFORMED = [
    ("cl+te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("dup-cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("bare-lf", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare-lf-header", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
    ("bad-chunk-size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("chunk-overflow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n", 400),
    ("chunk-bare-lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", 400),
    ("te-gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ("te-chunked-not-last", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("te-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("neg-cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("plus-cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\na", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("nul-in-header", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    ("ctl-in-target", b"GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("no-host-1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("garbage", b"HELLO\r\n\r\n", 400),
    ("bad-method", b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("http09", b"GET /\r\n\r\n", 400),
    ("http2-version", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("expect-unknown", b"POST / HTTP/1.1\r\nHost: a\r\nExpect: foo\r\nContent-Length: 1\r\n\r\na", 417),
    ("long-target", b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    ("big-headers", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-B: " + b"b" * 1100 + b"\r\n\r\n", 431),
    ("many-headers", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(25)) + b"\r\n",
     431),
    ("cl-too-big", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10001\r\n\r\n", 413),
    # Host (RFC 9110 7.2): exactly one uri-host [":" port]
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: user@localhost\r\n\r\n", 400),
    ("host-path", b"GET / HTTP/1.1\r\nHost: localhost/path\r\n\r\n", 400),
    ("host-empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    ("host-two-values", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400),
    ("host-bad-literal", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    ("host-1.0-invalid", b"GET / HTTP/1.0\r\nHost: a b\r\n\r\n", 400),
    ("asterisk-get", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    ("absolute-bad-authority", b"GET http://u@evil/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-other-scheme", b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # framing headers in disguise, and a repeated Content-Type, are refused rather than dropped or joined
    ("underscore-te", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nContent-Length: 1\r\n\r\na", 400),
    ("underscore-cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\nContent-Length: 1\r\n\r\na", 400),
    ("two-content-types", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: a/b\r\nContent-Type: c/d\r\n"
     b"Content-Length: 1\r\n\r\na", 400),
    # trailers are bounded like a head
    ("many-trailers", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
     + b"".join(b"X-T%d: 1\r\n" % i for i in range(25)) + b"\r\n", 431),
    ("big-trailers", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
     + b"X-T: " + b"t" * 1100 + b"\r\n\r\n", 431),
    ("chunked-too-big", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"1000\r\n" + b"x" * 4096,
     413),
]


@pytest.mark.parametrize(("name", "raw", "status"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_is_rejected_and_closed(engine: Callable[..., Engine], name: str, raw: bytes,
                                          status: int) -> None:
    e = engine()
    # A valid request first, the bad one, then a request that must never reach the app.
    first = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
    after = b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n"
    st, _, closed = exchange(e, first + raw + after, n=2)
    assert st == [200, status]
    assert closed
    assert "/after" not in e.seen
    still_serves(e)


def test_huge_single_header_without_end_is_431(engine: Callable[..., Engine]) -> None:
    # One header line that never ends: the parser would buffer it; the head byte budget stops it.
    e = engine()
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
        try:
            for _ in range(20):
                s.sendall(b"y" * 1024)
                time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = Reader(s)
        assert r.response()[0] == 431
    still_serves(e)


# -- timeouts -------------------------------------------------------------------------------------------

def test_idle_keepalive_is_closed(engine: Callable[..., Engine]) -> None:
    e = engine()
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        r = Reader(s)
        assert r.response()[0] == 200
        t0 = time.monotonic()
        assert r.closed()
        assert 0.15 < time.monotonic() - t0 < 2.0


def test_slowloris_head_gets_408(engine: Callable[..., Engine]) -> None:
    e = engine()
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        t0 = time.monotonic()
        r = Reader(s)
        assert r.response()[0] == 408
        assert r.closed()
        assert time.monotonic() - t0 < 2.0
    still_serves(e)


def test_slow_body_gets_408(engine: Callable[..., Engine]) -> None:
    e = engine()
    with e.connect() as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        r = Reader(s)
        assert r.response()[0] == 408
        assert r.closed()
    assert e.seen == []


def test_silent_connection_is_closed(engine: Callable[..., Engine]) -> None:
    e = engine()
    with e.connect() as s:
        s.settimeout(3)
        assert s.recv(100) == b""


def test_connection_cap_makes_room_for_a_new_client(engine: Callable[..., Engine]) -> None:
    """At --max-connections the longest idle keep-alive connection goes first, then the client that has waited
    longest on itself (silent, slow head, trickled body): a new client is served, not refused."""
    e = engine(limits=Limits(max_connections=2, header_timeout=30, body_timeout=30, keepalive_timeout=30))
    silent = e.connect()
    idle = e.connect()
    idle.sendall(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert Reader(idle).response()[0] == 200
    try:
        with e.connect() as c:  # the idle keep-alive connection makes room first, though the silent one is older
            c.sendall(b"GET /new HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert Reader(c).response()[0] == 200
        idle.settimeout(2)
        assert idle.recv(100) == b""
        time.sleep(1.1)  # the engine's clock ticks once a second here: `newer` is then younger
        newer = e.connect()
        time.sleep(0.05)
        with e.connect() as c, newer:  # then the client that has waited longest on itself: the older silent one
            c.sendall(b"GET /new HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert Reader(c).response()[0] == 200
            silent.settimeout(2)
            assert silent.recv(100) == b""
    finally:
        idle.close()
        silent.close()
    time.sleep(0.1)
    trickler = e.connect()
    trickler.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nx")
    time.sleep(1.1)
    other = e.connect()
    time.sleep(0.05)
    with e.connect() as c, trickler, other:
        c.sendall(b"GET /new HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert Reader(c).response()[0] == 200
        st, _, _ = Reader(trickler).response()
        assert st == 503  # a partial request hears why


def test_connection_cap_503_when_every_slot_is_in_the_app(engine: Callable[..., Engine]) -> None:
    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        time.sleep(0.5)
        start_response("200 OK", [])
        return [b"slow"]

    e = engine(slow, limits=Limits(max_connections=2), threads=2, validate=False)
    a, b = e.connect(), e.connect()
    try:
        for s in (a, b):
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.1)
        with e.connect() as c:
            st, _, _ = Reader(c).response()
            assert st == 503
        assert Reader(a).response()[0] == 200
    finally:
        a.close()
        b.close()


def test_a_trickled_body_gets_a_total_deadline(engine: Callable[..., Engine]) -> None:
    """--body-timeout plus 1 s per --min-body-rate bytes, not a clock that restarts on every byte."""
    e = engine(limits=Limits(body_timeout=0.4, min_body_rate=100, max_body_size=10_000))
    with e.connect() as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        got = b""
        while time.monotonic() - t0 < 5 and b"\r\n" not in got:
            try:
                s.sendall(b"x")  # 10 bytes/s: each byte well within the old per-byte timeout
            except OSError:
                break
            if select.select([s], [], [], 0.1)[0]:
                got += s.recv(4096)
        status = int(got.split(b" ")[1]) if got.startswith(b"HTTP/1.1 ") else None
        assert status == 408
        assert time.monotonic() - t0 < 1.5  # 0.4 s + ~5 bytes / 100 B/s, plus the sweep's period


# -- WSGI semantics ---------------------------------------------------------------------------------------

def test_head_has_length_but_no_body(engine: Callable[..., Engine]) -> None:
    e = engine()
    with e.connect() as s:
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /g HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        r = Reader(s)
        st, h, _ = r.response(head=True)
        assert st == 200 and int(h["content-length"]) > 0
        st, _, body = r.response()  # the next response starts right after the head: no stray body bytes
        assert st == 200 and body.startswith(b"GET /g")


def stream_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b""
    for i in range(3):
        yield b"part%d;" % i


def test_streaming_is_chunked_on_11_and_close_delimited_on_10(engine: Callable[..., Engine]) -> None:
    e = engine(stream_app)
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        st, h, body = Reader(s).response()
        assert h["transfer-encoding"] == "chunked" and body == b"part0;part1;part2;"
    st, bodies, closed = exchange(e, b"GET / HTTP/1.0\r\n\r\n")
    assert st == [200] and bodies == [b"part0;part1;part2;"] and closed


def test_app_content_length_is_honoured(engine: Callable[..., Engine]) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
        yield b"abc"
        yield b"def"

    e = engine(app)
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        r = Reader(s)
        for _ in range(2):
            st, h, body = r.response()
            assert st == 200 and body == b"abcdef" and "transfer-encoding" not in h


def test_204_has_no_body_and_keeps_alive(engine: Callable[..., Engine]) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("204 No Content", [])
        return []

    e = engine(app)
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        r = Reader(s)
        assert r.response()[0] == 204
        st, h, _ = r.response()
        assert st == 204 and "content-length" not in h and "transfer-encoding" not in h


def test_expect_100_continue(engine: Callable[..., Engine]) -> None:
    e = engine()
    with e.connect() as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        r = Reader(s)
        assert r.response()[0] == 100  # before we sent the body
        s.sendall(b"data")
        st, _, body = r.response()
        assert st == 200 and body.endswith(b"\ndata")


def test_expect_100_too_big_gets_413_without_continue(engine: Callable[..., Engine]) -> None:
    e = engine()
    st, _, closed = exchange(e, b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 99999\r\n\r\n")
    assert st == [413] and closed


def test_wsgi_input_length_semantics(engine: Callable[..., Engine]) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        inp = environ["wsgi.input"]
        line = inp.readline()
        rest = inp.read(100)
        more = inp.read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%s|%s|%s|%s" % (line, rest, more, environ["CONTENT_LENGTH"].encode())]

    e = engine(app, validate=False)  # read() without a size is outside PEP 3333 but apps do it
    st, bodies, _ = exchange(e, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\nab\ncdefgGET")
    assert st == [200] and bodies[0] == b"ab\n|cdefg||8"


def test_file_wrapper_sendfile(engine: Callable[..., Engine], tmp_path: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        f = open(path, "rb")  # noqa: SIM115 - closed by the server through the wrapper
        if environ["PATH_INFO"] == "/skip":
            f.seek(17)
        return environ["wsgi.file_wrapper"](f)

    # The validator wraps the file wrapper and hides it from sendfile, so it is off here.
    e = engine(app, validate=False, limits=Limits(keepalive_timeout=3, body_timeout=3))
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        r = Reader(s)
        time.sleep(0.2)  # let the socket fill: sendfile must resume on writability
        st, h, body = r.response()
        assert st == 200 and int(h["content-length"]) == len(data) and body == data
        s.sendall(b"GET /skip HTTP/1.1\r\nHost: a\r\n\r\n")
        assert r.response()[2] == data[17:]
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        st, h, _ = r.response(head=True)
        assert int(h["content-length"]) == len(data)
        assert r.response()[2] == data


def test_file_wrapper_on_non_file_iterates(engine: Callable[..., Engine]) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"x" * 100_000), 4096)

    e = engine(app)
    st, bodies, _ = exchange(e, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert st == [200] and bodies == [b"x" * 100_000]


def test_app_exception_is_500_and_worker_survives(engine: Callable[..., Engine],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/alive":
            return echo_app(environ, start_response)
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    e = engine(app, validate=False)
    with e.connect() as s:
        s.sendall(b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\nGET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        r = Reader(s)
        assert r.response()[0] == 500
        assert r.response()[2] == b"ok"  # same keep-alive connection still usable
    assert "RuntimeError: boom" in caplog.text


def test_exception_mid_stream_closes_connection(engine: Callable[..., Engine]) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        if environ["PATH_INFO"] == "/alive":
            yield from echo_app(environ, start_response)
            return
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        raise RuntimeError("mid-stream")

    e = engine(app, validate=False)
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert b"7\r\npartial\r\n" in data and not data.endswith(b"0\r\n\r\n")
    still_serves(e)


@pytest.mark.parametrize("bad", ["no-start-response", "str-body", "bad-status", "crlf-header"])
def test_app_protocol_errors_are_500(engine: Callable[..., Engine], bad: str) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["PATH_INFO"] == "/alive":
            return echo_app(environ, start_response)
        if bad == "no-start-response":
            return [b"x"]
        if bad == "str-body":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return ["text"]
        if bad == "bad-status":
            start_response("OK", [])
            return [b"x"]
        start_response("200 OK", [("X-A", "a\r\nSet-Cookie: evil")])
        return [b"x"]

    e = engine(app, validate=False)
    st, bodies, _ = exchange(e, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert st == [500] and b"evil" not in bodies[0]
    still_serves(e)


def test_backpressure_pauses_the_app(engine: Callable[..., Engine]) -> None:
    produced = [0]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for _ in range(64):
            produced[0] += 1
            yield b"z" * (1 << 20)

    e = engine(app, limits=Limits(body_timeout=5))
    with e.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)
        assert produced[0] < 32  # the generator waits for the client instead of buffering 64 MiB
        total = 0
        while chunk := s.recv(1 << 20):
            total += len(chunk)
    assert produced[0] == 64 and total > 64 * (1 << 20)


def test_threads_run_requests_concurrently(engine: Callable[..., Engine]) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            time.sleep(0.5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]

    e = engine(app, threads=4)
    slow = e.connect()
    try:
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        t0 = time.monotonic()
        st, bodies, _ = exchange(e, b"GET /fast HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert st == [200] and bodies == [b"/fast"] and time.monotonic() - t0 < 0.4
        assert Reader(slow).response()[2] == b"/slow"
    finally:
        slow.close()


def test_threads_pipelining_and_streaming(engine: Callable[..., Engine]) -> None:
    e = engine(stream_app, threads=2)
    reqs = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 5
    st, bodies, _ = exchange(e, reqs, n=5)
    assert st == [200] * 5 and set(bodies) == {b"part0;part1;part2;"}


def test_close_and_keepalive_heads_are_cached_apart(engine: Callable[..., Engine]) -> None:
    """The compiled-head cache keeps the `connection: close` variant of a head apart from the kept one."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/cl":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        else:
            start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]

    e = engine(app, validate=False)
    for path in ("/", "/cl"):
        for close in (True, False, True, False):
            req = f"GET {path} HTTP/1.1\r\nHost: a\r\n{'Connection: close' if close else 'X-A: 1'}\r\n\r\n"
            with e.connect() as s:
                s.sendall(req.encode())
                r = Reader(s)
                st, headers, body = r.response()
                s.settimeout(2)
                assert (st, body, headers["content-length"]) == (200, b"hello", "5"), (path, close)
                assert (headers.get("connection") == "close") == close, (path, close, headers)
                if close:
                    assert r.closed(), path
                else:  # still open: answers the next request
                    s.sendall(req.encode())
                    assert r.response()[0] == 200


def test_closed_connections_are_freed_by_reference_counting(engine: Callable[..., Engine]) -> None:
    """A closed connection holds no reference cycle (parser <-> protocol, bound methods kept on it), so it is
    freed when uvloop lets go of it, not by the cyclic collector later."""
    import gc

    from clusterctl.http.wsgi import WsgiProtocol

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is WsgiProtocol)

    e = engine(app, validate=False)
    assert exchange(e, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")[0] == [200]
    gc.collect()
    gc.disable()
    try:
        before = alive()
        for i in range(20):
            keep = i % 2  # the client closes a kept connection, or the server closes after the response
            st, _, _ = exchange(e, b"GET / HTTP/1.1\r\nHost: a\r\n" + (b"\r\n" if keep else b"Connection: close\r\n\r\n"))
            assert st == [200]
        time.sleep(0.2)  # the loop runs connection_lost for the last ones
        assert alive() - before <= 1
    finally:
        gc.enable()


class _Transport:
    """The few transport methods the protocol calls, recording what it writes (no socket, no loop turn)."""

    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:  # the compiled lane hands heads split over reads to Python
        pass


@pytest.mark.parametrize("kind", engines())
def test_requests_split_at_every_byte_parse_the_same(kind: str) -> None:
    """Two pipelined requests cut into reads at every position (and byte by byte): the same two answers.
    Covers a URL, a header and a body that span reads, and a message that starts mid-read."""
    import uvloop

    raw = (b"GET /some/path?q=1&r=two HTTP/1.1\r\nHost: a\r\nX-A: spans\r\n\r\n"
           b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    loop = uvloop.new_event_loop()
    try:
        server = WsgiServer(echo_app, loop, Limits())
        if kind == "compiled":
            assert fastlane.install(server)

        def answers(reads: list[bytes]) -> list[bytes]:
            proto = server.protocol()
            t = _Transport()
            proto.connection_made(t)
            for piece in reads:
                proto.data_received(piece)
            assert not t.closed
            return [part.split(b"\r\n\r\n", 1)[1] for part in t.out.split(b"HTTP/1.1 ")[1:]]

        whole = answers([raw])
        assert whole == [b"GET /some/path q=q=1&r=two cl= x=spans proto=HTTP/1.1\n",
                         b"POST /p q= cl=5 x= proto=HTTP/1.1\nhello"]
        for i in range(1, len(raw)):
            assert answers([raw[:i], raw[i:]]) == whole, i
        assert answers([raw[i:i + 1] for i in range(len(raw))]) == whole
    finally:
        loop.close()


def test_environ_names_both_ends_of_each_connection(engine: Callable[..., Engine]) -> None:
    """SERVER_NAME/PORT from the local address, REMOTE_ADDR/PORT from each connection's own peer (the fixed
    part of the environ is shared per local address; the peer's part must not leak between connections)."""
    seen: list[tuple[str, ...]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(tuple(environ[k] for k in ("SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR", "REMOTE_PORT")))
        environ["REMOTE_PORT"] = "spoiled by the app"  # an app may write its environ; the next one is fresh
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    e = engine(app)
    a, b = e.connect(), e.connect()
    with a, b:
        for s in (a, b, a, b):
            s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert Reader(s).response()[0] == 200
        ports = [str(s.getsockname()[1]) for s in (a, b, a, b)]
    assert seen == [("127.0.0.1", str(e.port), "127.0.0.1", p) for p in ports]


def environ_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    keys = ("HTTP_HOST", "HTTP_AUTHORIZATION", "HTTP_X_T", "PATH_INFO", "REQUEST_METHOD")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [repr({k: environ.get(k) for k in keys}).encode()]


def test_trailers_never_reach_the_app(engine: Callable[..., Engine]) -> None:
    """A trailer Authorization or Host is not a header a proxy in front ever saw: dropped, never merged."""
    e = engine(environ_app)
    raw = (b"POST /t HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\nAuthorization: Bearer smuggled\r\nHost: evil.example.com\r\nX-T: 1\r\n\r\n")
    st, bodies, _ = exchange(e, raw + raw, n=2)  # the second one queued: the same holds for pipelined requests
    assert st == [200, 200]
    for body in bodies:
        seen = eval(body)
        assert seen["HTTP_HOST"] == "example.com" and seen["HTTP_AUTHORIZATION"] is None and seen["HTTP_X_T"] is None
    assert exchange(e, b"GET /alive HTTP/1.1\r\nHost: a\r\n\r\n", n=1)[0] == [200]


def test_host_forms_that_are_valid(engine: Callable[..., Engine]) -> None:
    e = engine(environ_app)
    for host in (b"example.com", b"example.com:8080", b"127.0.0.1:80", b"[::1]:8000", b"[::1]", b"xn--bcher-kva.ch"):
        st, bodies, _ = exchange(e, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", n=1)
        assert st == [200] and eval(bodies[0])["HTTP_HOST"] == host.decode(), host
    st, bodies, _ = exchange(e, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", n=1)
    assert st == [200] and eval(bodies[0])["REQUEST_METHOD"] == "OPTIONS"


def test_absolute_form_authority_wins_over_host(engine: Callable[..., Engine]) -> None:
    """RFC 9112 3.2.2: with an absolute-form target the server uses its authority and ignores Host."""
    e = engine(environ_app)
    st, bodies, _ = exchange(e, b"GET http://origin.example:81/p?q HTTP/1.1\r\nHost: other.example\r\n\r\n", n=1)
    assert st == [200]
    seen = eval(bodies[0])
    assert seen["HTTP_HOST"] == "origin.example:81" and seen["PATH_INFO"] == "/p"


def test_a_header_field_over_its_own_limit_is_431(engine: Callable[..., Engine]) -> None:
    e = engine(limits=Limits(max_header_field=100, max_header_size=4096))
    st, _, closed = exchange(e, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 200 + b"\r\n\r\n", n=1)
    assert st == [431] and closed
    st, _, _ = exchange(e, b"GET / HTTP/1.1\r\nHost: a\r\nX-Ok: " + b"b" * 80 + b"\r\n\r\n", n=1)
    assert st == [200]


def test_buffered_bodies_are_bounded_per_worker(engine: Callable[..., Engine]) -> None:
    """Stalled uploads hold at most --max-buffered together: the one that would pass it gets 503, and what a
    closed or completed upload held is counted back."""
    e = engine(limits=Limits(max_buffered=5000, max_body_size=10_000, body_timeout=30))
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4000\r\n\r\n"
    first = e.connect()
    first.sendall(head + b"x" * 3000)  # stalls with 3000 bytes buffered
    time.sleep(0.1)
    with e.connect() as second:
        second.sendall(head + b"y" * 3000)  # 6000 > 5000
        assert Reader(second).response()[0] == 503
    first.close()  # its 3000 bytes are let go
    time.sleep(0.1)
    for _ in range(3):  # completed uploads are counted back too
        st, bodies, _ = exchange(e, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + b"z" * 4000, n=1)
        assert st == [200] and bodies[0].endswith(b"z" * 4000)
    assert e.server.buffered == 0


def test_buffered_count_survives_every_way_a_body_ends(engine: Callable[..., Engine]) -> None:
    e = engine(limits=Limits(max_buffered=50_000, max_body_size=10_000, body_timeout=0.3))
    cases = [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n" + b"x" * 5000,  # 413 up front
             b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1000\r\n" + b"x" * 4096 * 3,
             b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 900\r\n\r\n" + b"x" * 100,  # 408 after a stall
             b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab\x00"]  # client leaves mid-body
    for raw in cases:
        with e.connect() as s:
            s.sendall(raw)
            time.sleep(0.05)
    time.sleep(1.0)
    assert e.server.buffered == 0
    still_serves(e)


def test_without_the_compiled_lane_the_python_engine_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not built (no compiler, CLUSTERCTL_NO_COMPILE=1): auto picks the Python engine with one line saying why,
    and asking for the compiled one is an error, not a silent fallback."""
    import asyncio

    monkeypatch.setattr(fastlane, "_fast", None)
    monkeypatch.setattr(fastlane, "_WHY", "the compiled engine is not built (test)")
    loop = asyncio.new_event_loop()
    try:
        server = WsgiServer(echo_app, loop)
        assert not fastlane.available() and not fastlane.install(server)
        assert fastlane.choose(server, "auto") == ("python", "engine: python (the compiled engine is not built (test))")
        with pytest.raises(RuntimeError, match="not built"):
            fastlane.choose(server, "compiled")
        assert type(server.protocol()).__name__ == "WsgiProtocol"
    finally:
        loop.close()
