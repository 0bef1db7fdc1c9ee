"""Behind a proxy: trusted forwarded headers and the PROXY protocol, parsed (unit) and served (raw sockets)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clusterctl.http.asgi import AsgiServer
from clusterctl.http.proxy import ProxyHeaderError, forwarded_client, parse_proxy_header, parse_trusted
from clusterctl.http.server import Server
from clusterctl.http.wsgi import WsgiServer
from tests.engine_thread import EngineThread

# -- parsing ------------------------------------------------------------------------------------------------

def test_trusted_lists() -> None:
    t = parse_trusted("127.0.0.1, 10.0.0.0/8,::1")
    assert t is not None and t.trusts("10.2.3.4") and t.trusts("::1") and t.trusts("::ffff:127.0.0.1")
    assert not t.trusts("192.0.2.1") and not t.trusts(None) and not t.trusts("nonsense")
    assert parse_trusted("") is None
    assert parse_trusted("*").trusts("192.0.2.1")  # type: ignore[union-attr]
    assert parse_trusted("unix").trusts(None) and not parse_trusted("unix").trusts("1.2.3.4")  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"not an IP address or network: 'proxy\.example'"):
        parse_trusted("127.0.0.1,proxy.example")


@pytest.mark.parametrize(("headers", "client", "scheme"), [
    ([(b"X-Forwarded-For", b"203.0.113.7")], "203.0.113.7", None),
    ([(b"X-Forwarded-For", b"203.0.113.7, 10.0.0.2"), (b"X-Forwarded-Proto", b"https")], "203.0.113.7", "https"),
    # a client that writes its own X-Forwarded-For gets the address the trusted proxy saw, not its claim
    ([(b"X-Forwarded-For", b"1.1.1.1, 198.51.100.9")], "198.51.100.9", None),
    ([(b"x-forwarded-for", b"2001:db8::1"), (b"x-forwarded-proto", b"ftp")], "2001:db8::1", None),
    ([(b"Forwarded", b'for=192.0.2.60;proto=https;by=203.0.113.43')], "192.0.2.60", "https"),
    ([(b"Forwarded", b'for="[2001:db8:cafe::17]:4711", for=10.0.0.5')], "2001:db8:cafe::17", None),
    ([(b"X-Forwarded-Proto", b"https")], None, "https"),
    ([], None, None),
])
def test_forwarded_client(headers: list[tuple[bytes, bytes]], client: str | None, scheme: str | None) -> None:
    assert forwarded_client(headers, parse_trusted("10.0.0.0/8")) == (client, scheme)  # type: ignore[arg-type]


def v2(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 80, command: int = 1) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(body)) + body


def test_proxy_header_parsing() -> None:
    line = b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 80\r\n"
    assert parse_proxy_header(line + b"GET /") == (len(line), ("198.51.100.22", 35646))
    assert parse_proxy_header(line[:20]) is None  # not complete yet
    assert parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")[1] == ("2001:db8::1", 1)  # type: ignore[index]
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, None)
    h = v2("192.0.2.9", 4242)
    assert parse_proxy_header(h + b"GET") == (len(h), ("192.0.2.9", 4242))
    assert parse_proxy_header(h[:10]) is None and parse_proxy_header(h[:20]) is None
    assert parse_proxy_header(v2("192.0.2.9", 1, command=0)) == (len(h), None)  # LOCAL: a health check
    for bad in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 nope 1.2.3.4 1 2\r\n", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 99999\r\n",
                b"PROXY " + b"x" * 120, b"\r\n\r\n\x00\r\nQUIT\n\x30\x11\x00\x00"):
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(bad)


# -- served -------------------------------------------------------------------------------------------------

def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps([environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]]).encode()]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps([scope["client"][0], scope["scheme"]]).encode()})


@pytest.fixture
def serve() -> Iterator[Callable[..., EngineThread]]:
    started: list[EngineThread] = []

    def start(asgi: bool, trusted: str, proxy_protocol: bool = False) -> EngineThread:
        def make(loop: asyncio.AbstractEventLoop) -> Server:
            server = AsgiServer(asgi_app, loop) if asgi else WsgiServer(wsgi_app, loop)
            server.behind_proxy(parse_trusted(trusted), proxy_protocol)
            return server

        e = EngineThread(make)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def ask(e: EngineThread, raw: bytes) -> list[Any]:
    with socket.create_connection(("127.0.0.1", e.port), timeout=3) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length" in head.lower() \
            else int(rest.split(b"\r\n")[0], 16)
        if b"content-length" in head.lower():
            answers.append(json.loads(rest[:n]))
            data = rest[n:]
        else:  # chunked: one chunk, then 0
            _, _, rest = rest.partition(b"\r\n")
            answers.append(json.loads(rest[:n]))
            data = rest[n + 2:].partition(b"0\r\n\r\n")[2]
    return answers


GET = b"GET / HTTP/1.1\r\nHost: a\r\n"


@pytest.mark.parametrize("asgi", [False, True], ids=["wsgi", "asgi"])
def test_trusted_peer_sets_client_and_scheme_per_request(serve: Callable[..., EngineThread], asgi: bool) -> None:
    e = serve(asgi, "127.0.0.1")
    raw = (GET + b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n"
           + GET + b"Connection: close\r\n\r\n")  # the next request on the connection: back to the peer
    assert ask(e, raw) == [["203.0.113.7", "https"], ["127.0.0.1", "http"]]


@pytest.mark.parametrize("asgi", [False, True], ids=["wsgi", "asgi"])
def test_untrusted_peer_headers_are_ignored(serve: Callable[..., EngineThread], asgi: bool) -> None:
    e = serve(asgi, "10.0.0.0/8")
    raw = GET + b"X-Forwarded-For: 203.0.113.7\r\nForwarded: for=1.2.3.4;proto=https\r\nConnection: close\r\n\r\n"
    assert ask(e, raw) == [["127.0.0.1", "http"]]


@pytest.mark.parametrize("asgi", [False, True], ids=["wsgi", "asgi"])
def test_proxy_protocol_names_the_client(serve: Callable[..., EngineThread], asgi: bool) -> None:
    e = serve(asgi, "", proxy_protocol=True)
    assert ask(e, b"PROXY TCP4 198.51.100.22 127.0.0.1 35646 80\r\n" + GET + b"Connection: close\r\n\r\n") == [
        ["198.51.100.22", "http"]]
    header = v2("192.0.2.9", 4242)
    with socket.create_connection(("127.0.0.1", e.port), timeout=3) as s:  # the header split across reads
        s.sendall(header[:7])
        s.sendall(header[7:] + GET + b"Connection: close\r\n\r\n")
        assert b'["192.0.2.9", "http"]' in s.recv(65536)
    with socket.create_connection(("127.0.0.1", e.port), timeout=3) as s:  # no header: closed, nothing served
        s.sendall(GET + b"\r\n")
        assert s.recv(65536) == b""
