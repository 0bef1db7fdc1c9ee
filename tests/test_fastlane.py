"""The compiled fast lane (clusterctl/http/_fast.c) against the Python protocol: the same bytes in, the same
bytes out (Date aside), over real sockets, for a corpus of valid, odd and hostile requests and for mutated
ones; the fast path really serves the common shape; hand-offs keep every semantic of the Python engine.

tests/test_engine.py runs all its tests on both protocols too; here the apps are not wrapped in wsgiref's
validator (its iterator wrapper would send every response through the Python protocol's adoption).
"""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterctl.http import fastlane
from clusterctl.http.protocol import Limits
from clusterctl.http.wsgi import WsgiProtocol, WsgiServer
from tests.engine_thread import EngineThread, send_half_closed
from tests.test_engine import MALFORMED, VALID, Reader
from tests.test_fuzz import SETTINGS, mutated

pytestmark = pytest.mark.skipif(not fastlane.available(), reason=fastlane.why_not() or "not built")

LIMITS = Limits(keepalive_timeout=1.0, header_timeout=1.0, body_timeout=1.0, max_request_line=512,
                max_header_size=2048, max_headers=30, max_body_size=10_000, max_connections=64)
SKIP = {"wsgi.input", "wsgi.errors", "wsgi.file_wrapper", "REMOTE_PORT", "SERVER_PORT"}  # objects; ports differ


# More than the kernel's send buffer can take (tcp_wmem's maximum is 4 MiB here) plus the client's 64 KiB:
# the rest waits in the transport, which pauses writing.
BIG = 16 << 20

def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """Answers with what it saw; the path picks a response shape (the fast one and each hand-over)."""
    body = environ["wsgi.input"].read()
    seen = "".join(f"{k}={environ[k]!r}\n" for k in sorted(environ) if k not in SKIP).encode() + b"body=" + body
    path = environ["PATH_INFO"]
    if path == "/gen":
        def gen() -> Iterator[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield seen
            yield b"!"
        return gen()
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written;")
        return [seen]
    if path == "/raise":
        raise RuntimeError("app failure (expected by the test)")
    if path == "/cl":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(seen)))])
        return [seen]
    if path == "/bad-head":
        start_response("200 OK", [("Bad Name", "x")])
        return [b"never"]
    if path == "/204":
        start_response("204 No Content", [])
        return [b""]
    if path == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [b"x" * BIG]
    odd = ODD_APPS.get(path)
    if odd is not None:
        return odd(start_response, seen)
    if path == "/tuple":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (seen, b"+")
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Len", str(len(body)))])
    return [seen]


def _twice(start_response: Callable[..., Any], seen: bytes) -> Any:
    start_response("200 OK", [])
    start_response("500 Oops", [])
    return [seen]


def _exc_info(start_response: Callable[..., Any], seen: bytes) -> Any:
    start_response("200 OK", [("X-First", "1")])
    try:
        raise ValueError("replaced")
    except ValueError:
        import sys

        start_response("503 Service Unavailable", [("Retry-After", "1")], sys.exc_info())
    return [b"replaced"]


# App behaviours outside PEP 3333's common shape (or against it): the Python protocol decides each one.
ODD_APPS: dict[str, Callable[[Callable[..., Any], bytes], Any]] = {
    "/headers-tuple": lambda sr, seen: (sr("200 OK", (("Content-Type", "text/plain"),)), [seen])[1],
    "/status-bytes": lambda sr, seen: (sr(b"200 OK", []), [seen])[1],
    "/status-short": lambda sr, seen: (sr("200", []), [seen])[1],
    "/header-int": lambda sr, seen: (sr("200 OK", [("X-N", 1)]), [seen])[1],
    "/header-crlf": lambda sr, seen: (sr("200 OK", [("X-N", "a\r\nb")]), [seen])[1],
    "/no-start": lambda sr, seen: [seen],
    "/str-body": lambda sr, seen: (sr("200 OK", []), ["text"])[1],
    "/two-parts": lambda sr, seen: (sr("200 OK", []), [b"a", b"b"])[1],
    "/none": lambda sr, seen: (sr("200 OK", []), None)[1],
    "/empty-list": lambda sr, seen: (sr("200 OK", []), [])[1],
    "/cl-short": lambda sr, seen: (sr("200 OK", [("Content-Length", "999")]), [seen])[1],
    "/cl-long": lambda sr, seen: (sr("200 OK", [("Content-Length", "2")]), [seen])[1],
    "/conn-close": lambda sr, seen: (sr("200 OK", [("Connection", "close")]), [seen])[1],
    "/date": lambda sr, seen: (sr("200 OK", [("Date", "then")]), [seen])[1],
    "/te": lambda sr, seen: (sr("200 OK", [("Transfer-Encoding", "chunked")]), [seen])[1],
    "/304": lambda sr, seen: (sr("304 Not Modified", []), [seen])[1],
    "/twice": _twice,
    "/exc-info": _exc_info,
}


class Engine(EngineThread):
    def __init__(self, compiled: bool, access: list[tuple[str, int, int]] | None = None) -> None:
        self.loop_errors: list[str] = []

        def make(loop: asyncio.AbstractEventLoop) -> WsgiServer:
            loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(repr(ctx)))
            log = None
            if access is not None:
                def log(proto: Any, status: int, nbytes: int) -> None:
                    access.append((f'{proto.base_env["REMOTE_ADDR"]} "{proto.req_line}"', status, nbytes))
                    assert time.perf_counter() - proto.t0 < 5
            server = WsgiServer(app, loop, LIMITS, access_log=log)
            if compiled:
                assert fastlane.install(server)
            return server

        super().__init__(make, backlog=256)

    def send(self, data: bytes, pieces: int = 1) -> bytes:
        """Send (in `pieces` writes), half-close, read until the server closes; what came back, Date masked."""
        return re.sub(rb"date: [^\r]*\r\n", b"date: -\r\n", send_half_closed(self.port, data, pieces))


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Engine, Engine]]:
    py, c = Engine(False), Engine(True)
    yield py, c
    py.stop()
    c.stop()
    assert py.loop_errors == [] and c.loop_errors == []


def same(pair: tuple[Engine, Engine], data: bytes, pieces: int = 1) -> bytes:
    py, c = pair
    expect = py.send(data, pieces)
    got = c.send(data, pieces)
    assert got == expect, (data[:300], expect[:600], got[:600])
    return got


EXTRA = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /q?a=1&b=%20x HTTP/1.1\r\nhost: a.b:8080\r\nConnection: close\r\n\r\n",
    b"GET /a%2Fb%ZZ HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nX-A:   padded \t \r\nX-Empty:\r\nX-Tab: a\tb\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n",
    b"GET /obs HTTP/1.1\r\nHost: a\r\nX-A: caf\xe9\r\n\r\n",
    b"GET /frag#x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /quote\" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, te\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Connection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3 \r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n",
    b"GET /p%00q HTTP/1.1\r\nHost: a\r\nX-\x7f: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\nContent-Type: text/plain\r\n\r\nhello"
    b"GET /n HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"DELETE /d HTTP/1.1\r\nHost: a\r\n\r\nPATCH /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nz"
    b"OPTIONS /o HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /v10 HTTP/1.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 9000\r\n\r\n" + b"x" * 9000,
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(29)) + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n",
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / http/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
] + [b"GET /%s HTTP/1.1\r\nHost: a\r\n\r\n" % p for p in (b"gen", b"write", b"raise", b"cl", b"bad-head", b"204",
                                                        b"tuple")] + [
    b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % p.encode() for p in ODD_APPS]
CORPUS = [raw for raw, _ in VALID] + [raw for _, raw, _ in MALFORMED] + EXTRA


@pytest.mark.parametrize("raw", CORPUS, ids=[f"{i}:{r[:20]!r}" for i, r in enumerate(CORPUS)])
def test_same_bytes_as_the_python_protocol(pair: tuple[Engine, Engine], raw: bytes) -> None:
    same(pair, raw)
    # then with the next request behind it, and with every response shape in one connection
    same(pair, raw + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")


def test_split_reads_are_handed_to_the_python_protocol(pair: tuple[Engine, Engine]) -> None:
    data = b"".join(EXTRA[:6]) + b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    for pieces in (2, 3, 7):
        same(pair, data, pieces)


@SETTINGS
@given(data=mutated())
def test_mutated_requests_get_the_same_answer(pair: tuple[Engine, Engine], data: bytes) -> None:
    same(pair, data)


@SETTINGS
@given(paths=st.lists(st.sampled_from(["/", "/gen", "/write", "/cl", "/204", "/tuple", "/raise", "/x?y", *ODD_APPS]),
                      min_size=1, max_size=6),
       close=st.booleans())
def test_pipelined_shapes_get_the_same_answers(pair: tuple[Engine, Engine], paths: list[str], close: bool) -> None:
    data = b"".join(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % p.encode() for p in paths)
    if close:
        data += b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    same(pair, data)


def test_the_common_shape_stays_on_the_compiled_protocol() -> None:
    """Keep-alive requests of the common shape never leave the C protocol; an odd one hands the connection
    over for good; the counters are the Server's either way."""
    e = Engine(True)
    try:
        server = e.server
        with socket.create_connection(("127.0.0.1", e.port), timeout=3) as s:
            r = Reader(s)
            for i in range(5):
                s.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                assert r.response()[0] == 200
            time.sleep(0.05)
            kinds = {type(c).__name__ for c in list(server.connections)}
            assert kinds == {"FastWsgi"}, kinds
            s.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert r.response(head=True)[0] == 200
            r.f.close()  # else its file object keeps the socket open after the with block
            kinds = {type(c).__name__ for c in list(server.connections)}
            assert kinds == {"WsgiProtocol"}, kinds
        time.sleep(0.2)
        assert (server.served, server.in_flight, len(server.connections)) == (6, 0, 0)
    finally:
        e.stop()


def test_access_log_lines_are_the_same() -> None:
    lines: dict[bool, list[tuple[str, int, int]]] = {}
    for compiled in (False, True):
        lines[compiled] = []
        e = Engine(compiled, access=lines[compiled])
        try:
            e.send(b"GET /a?b HTTP/1.1\r\nHost: a\r\n\r\nGET /raise HTTP/1.1\r\nHost: a\r\n\r\n"
                   b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        finally:
            e.stop()
    assert lines[True] == lines[False]
    assert [status for _, status, _ in lines[True]] == [200, 500, 200]


def test_closed_connections_are_freed_by_reference_counting() -> None:
    e = Engine(True)
    try:
        e.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        gc.collect()
        gc.disable()
        try:
            before = sum(1 for o in gc.get_objects() if isinstance(o, (fastlane.FastWsgi, WsgiProtocol)))
            # (not /raise here: pytest's log capture keeps each logged traceback, and its frames, alive)
            for path in (b"/", b"/gen", b"/write", b"/204") * 5:
                e.send(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
            time.sleep(0.2)
            after = sum(1 for o in gc.get_objects() if isinstance(o, (fastlane.FastWsgi, WsgiProtocol)))
            assert after - before <= 1
        finally:
            gc.enable()
    finally:
        e.stop()


def test_engine_choice() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert fastlane.choose(WsgiServer(app, loop), "auto")[0] == "compiled"
        assert fastlane.choose(WsgiServer(app, loop), "python")[0] == "python"
        threaded = WsgiServer(app, loop, threads=2)
        assert fastlane.choose(threaded, "auto")[0] == "python"
        with pytest.raises(RuntimeError, match="--engine compiled"):
            fastlane.choose(threaded, "compiled")
        threaded.close()
        with pytest.raises(ValueError, match="--engine"):
            fastlane.choose(WsgiServer(app, loop), "fast")
    finally:
        loop.close()


def test_a_streamed_response_holds_the_app_slot() -> None:
    """While one connection's generator streams (one chunk per loop turn), another connection's request waits
    for the app slot, as on the Python protocol: no app code runs between the stream's chunks."""
    events: list[str] = []

    def slot_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        if environ["PATH_INFO"] != "/stream":
            events.append("other")
            return [b"other"]

        def stream() -> Iterator[bytes]:
            for i in range(100):
                time.sleep(0.002)
                events.append("chunk")
                yield b"%d;" % i
            events.append("end")
        return stream()

    def make(loop: asyncio.AbstractEventLoop) -> WsgiServer:
        server = WsgiServer(slot_app, loop, LIMITS)
        assert fastlane.install(server)
        return server

    e = EngineThread(make)
    try:
        with socket.create_connection(("127.0.0.1", e.port), timeout=3) as a, \
                socket.create_connection(("127.0.0.1", e.port), timeout=3) as b:
            a.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
            assert a.recv(10).startswith(b"HTTP/1.1")
            b.sendall(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
            rb = Reader(b)
            assert rb.response()[2] == b"other"
            rb.f.close()
        assert events.index("other") > events.index("end"), events
    finally:
        e.stop()


def test_max_requests_hook_fires_once_at_its_count() -> None:
    fired: list[int] = []

    def make(loop: asyncio.AbstractEventLoop) -> WsgiServer:
        server = WsgiServer(app, loop, LIMITS)
        server.recycle_at = 3  # what the runtime sets for --max-requests, before serving
        server.on_recycle = lambda: fired.append(server.served)
        assert fastlane.install(server)
        return server

    e = EngineThread(make)
    try:
        send_half_closed(e.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 5)
        assert fired == [3] and e.server.served == 5
    finally:
        e.stop()


def test_a_client_that_does_not_read_is_handed_to_the_python_protocol() -> None:
    """A big response the client does not read pauses writing; its next request waits (the Python protocol's
    queue) instead of being answered into a full buffer, and the answers come in order once it reads."""
    e = Engine(True)
    try:
        with socket.create_connection(("127.0.0.1", e.port), timeout=5) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.15)  # well within LIMITS.body_timeout, after which a stalled write is aborted
            s.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.15)
            assert {type(c).__name__ for c in list(e.server.connections)} == {"WsgiProtocol"}
            r = Reader(s)
            assert r.response()[2] == b"x" * BIG
            status, _, body = r.response()
            assert status == 200 and b"PATH_INFO='/after'" in body
            r.f.close()
    finally:
        e.stop()
