"""The engine's test harness: a Server on 127.0.0.1:<port>, run by its own event loop in a thread.

Shared by the WSGI, ASGI and fuzz tests, which differ only in the server they build; with the limits
(SMALL) and the one-response-at-a-time client (Reader) they share.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from clusterctl.http import fastlane
from clusterctl.http.server import Limits


class EngineThread:
    """`make_server(loop)` builds the server inside the thread; `stop()` force-closes it and the loop."""

    def __init__(self, make_server: Callable[[asyncio.AbstractEventLoop], Any], backlog: int = 128) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.loop = uvloop.new_event_loop()
        self.server: Any = None
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = make_server(self.loop)
            self.loop.run_until_complete(self.server.serve([self.sock]))
            ready.set()
            self.loop.run_forever()
            self.server.force_close()
            self.server.close()
            self.loop.run_until_complete(asyncio.sleep(0.01))
            self.loop.close()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# Tight limits, so the timeouts and caps are reached in a test's time.
SMALL = Limits(keepalive_timeout=0.2, header_timeout=0.3, body_timeout=0.3, max_request_line=200,
               max_header_size=1024, max_headers=20, max_body_size=10_000, max_connections=50)


# -- a tiny HTTP/1.1 client that reads exactly one response at a time ---------------------------------------

class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.f = sock.makefile("rb")

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        line = self.f.readline()
        if not line:
            raise ConnectionError("closed")
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while True:
            h = self.f.readline()
            if h in (b"\r\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if head or status in (100, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self.f.read(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self.f.readline().split(b";")[0], 16)
                if size == 0:
                    self.f.readline()
                    return status, headers, body
                body += self.f.read(size)
                assert self.f.read(2) == b"\r\n"
        return status, headers, self.f.read()

    def closed(self) -> bool:
        try:
            return self.f.read(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False
def send_half_closed(port: int, data: bytes, pieces: int = 1) -> bytes:
    """Send `data` (in `pieces` writes), half-close, read until the server closes (or a short timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        try:
            step = max(1, len(data) // pieces)
            for i in range(0, len(data), step):
                s.sendall(data[i:i + step])
                if pieces > 1:
                    time.sleep(0.005)  # separate reads on the server's side
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may answer 4xx and close before reading it all
            pass
        got = b""
        s.settimeout(2.5)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return got


def engines() -> list[Any]:
    """Every engine test runs on the Python protocol and on the compiled fast lane (issue 21) in front of it."""
    return ["python", pytest.param("compiled", marks=pytest.mark.skipif(
        not fastlane.available(), reason=fastlane.why_not() or "not built"))]
