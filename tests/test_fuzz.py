"""Fuzzing the HTTP engine over a real socket: random bytes and mutated valid requests never crash it,
never raise into the event loop, and never leave it unable to serve the next connection.

One engine (uvloop, in a thread, small limits) serves a trivial WSGI app for the whole module; each
example opens a connection, sends its bytes, half-closes, reads whatever comes back, then a fresh
connection must get a correct 200. Bounded (200 examples per strategy) so it runs in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterctl.http import fastlane
from clusterctl.http.server import Limits, Server
from clusterctl.http.wsgi import WsgiServer
from tests.engine_thread import EngineThread, engines, send_half_closed

LIMITS = Limits(keepalive_timeout=1.0, header_timeout=1.0, body_timeout=1.0, max_request_line=512,
                max_header_size=2048, max_headers=30, max_body_size=4096, max_connections=64)
VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /path?q=1&r=%20x HTTP/1.1\r\nHost: a\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n",
    b"POST /submit HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Check: 1\r\n\r\n",
]
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = environ["wsgi.input"].read()
    # What only a trailer could have set: the trailer test below asserts the app never sees it.
    leaked = [k for k in environ if k.startswith("HTTP_TRAILER_") or environ.get(k) == "smuggled"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok " + str(len(body)).encode() + (b" LEAKED " + repr(leaked).encode() if leaked else b"")]


class Engine(EngineThread):
    """The engine on 127.0.0.1:<port> in a thread; collects anything raised into the event loop."""

    def __init__(self, compiled: bool = False) -> None:
        self.loop_errors: list[str] = []

        def make(loop: asyncio.AbstractEventLoop) -> Server:
            loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(repr(ctx)))
            server = WsgiServer(app, loop, LIMITS)
            if compiled:  # the C fast lane (issue 21) in front of the Python protocol
                assert fastlane.install(server)
            return server

        super().__init__(make, backlog=256)


    def send(self, data: bytes) -> bytes:
        """Send, half-close, read until the server closes (or a short timeout); the bytes received."""
        return send_half_closed(self.port, data)

    def check_still_serves(self) -> None:
        got = self.send(b"POST /next HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        assert got.endswith(b"ok 3"), got[-200:]
        assert self.thread.is_alive()
        assert self.loop_errors == []


@pytest.fixture(scope="module", params=engines())
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    e = Engine(compiled=request.param == "compiled")
    yield e
    e.stop()


def check(engine: Engine, data: bytes) -> None:
    got = engine.send(data)
    assert got == b"" or got.startswith(b"HTTP/1."), got[:200]
    engine.check_still_serves()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with a few random edits: bytes flipped, inserted, deleted, or slices repeated."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "special"]))
        if op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "repeat":
            end = draw(st.integers(pos, min(len(data), pos + 64)))
            data[pos:pos] = data[pos:end] * draw(st.integers(1, 40))
        else:
            data[pos:pos] = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b"\r\n\r\n",
                                                  b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
                                                  b"Content-Length: -1\r\n", b"ffffffffffffffff\r\n", b"%",
                                                  b"\xff\xfe", b"HTTP/1.1"]))
    return bytes(data)


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes(engine: Engine, data: bytes) -> None:
    check(engine, data)


@SETTINGS
@given(data=mutated())
def test_mutated_valid_requests(engine: Engine, data: bytes) -> None:
    check(engine, data)


def test_valid_corpus_is_answered(engine: Engine) -> None:
    for data in VALID:
        got = engine.send(data)
        assert got.startswith(b"HTTP/1.") and b" 200 " in got.split(b"\r\n", 1)[0], (data, got[:200])


TRAILER_NAMES = [b"Host", b"Authorization", b"Content-Length", b"Transfer-Encoding", b"Cookie", b"Trailer-X",
                 b"X-Forwarded-For", b"Trailer_Y", b"trailer-z"]


@st.composite
def chunked_with_trailers(draw: st.DrawFn) -> bytes:
    """A chunked request whose trailer section has random fields (framing and authority names included)."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n"
    fields = draw(st.lists(st.tuples(st.sampled_from(TRAILER_NAMES), st.sampled_from([b"smuggled", b"1", b"a, b", b""])),
                           max_size=40))
    trailers = b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    return (b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + body + trailers + b"\r\n")


@SETTINGS
@given(data=chunked_with_trailers())
def test_trailers_are_bounded_and_never_reach_the_app(engine: Engine, data: bytes) -> None:
    got = engine.send(data)
    status = got.split(b"\r\n", 1)[0]
    assert status.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), got[:200]
    assert b"LEAKED" not in got, got[-300:]
    engine.check_still_serves()
