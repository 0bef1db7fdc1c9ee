"""The engine's test harness: a Server on 127.0.0.1:<port>, run by its own event loop in a thread.

Shared by the WSGI, ASGI and fuzz tests, which differ only in the server they build.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvloop


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
