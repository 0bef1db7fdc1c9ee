"""The bundled example WSGI app: `clusterctl run --app examples.hello:app --bind 127.0.0.1:8000`.

Besides hello world it has endpoints the runtime's tests and demos use: `/slow?seconds=S` blocks (drain),
`/hang` blocks the event loop for an hour (watchdog), `/pid` tells which worker answered, `/health`,
`/grow?mb=N` keeps N MiB more in memory (--max-memory-restart).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from clusterctl import worker

HELLO = b"Hello, world!\n"
_kept: list[bytearray] = []  # /grow


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [HELLO]
    if path == "/health":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    if path == "/pid":
        body = f"{os.getpid()} {worker.instance}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    if path == "/slow":
        seconds = float(parse_qs(environ["QUERY_STRING"]).get("seconds", ["1"])[0])
        time.sleep(min(seconds, 300.0))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"slept {seconds}\n".encode()]
    if path == "/grow":
        mb = min(int(parse_qs(environ["QUERY_STRING"]).get("mb", ["64"])[0]), 1024)
        _kept.append(bytearray(mb << 20))  # zero-filled, so resident
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"holding {sum(len(b) for b in _kept) >> 20} MiB\n".encode()]
    if path == "/hang":
        time.sleep(3600)  # blocks the event loop: WATCHDOG=1 stops and systemd kills the worker
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"woke up\n"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
