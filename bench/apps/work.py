"""The benchmark's WSGI app: `/` hello world, `/cpu` a fixed amount of pure-Python work (~5 ms, calibrated
by bench/run.py and passed as BENCH_CPU_ITERS so every server does the same work). Every answer names the
process in an X-Pid header, so a client can count requests per worker for servers without our STATUS=.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

ITERS = int(os.environ.get("BENCH_CPU_ITERS", "20000"))
HELLO = b"Hello, world!\n"


def burn(iters: int) -> int:
    """CPU-bound and GIL-holding on purpose: only more processes make it faster, never more threads."""
    acc = 0
    for i in range(iters):
        acc = (acc + i * i) % 1000003
    return acc


def calibrate(target_s: float = 0.005) -> int:
    """Iterations of burn() that take about target_s on this machine (best of a few tries)."""
    n = 20000
    best = min(_time(n) for _ in range(5))
    return max(1000, int(n * target_s / best))


def _time(n: int) -> float:
    t0 = time.perf_counter()
    burn(n)
    return time.perf_counter() - t0


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    pid = str(os.getpid())
    path = environ["PATH_INFO"]
    if path == "/cpu":
        body = f"{burn(ITERS)}\n".encode()
    elif path == "/":
        body = HELLO
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("X-Pid", pid)])
        return [b"not found\n"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", pid)])
    return [body]
