"""A bounded HTTP load for end-to-end tests: a few client threads inside a sandbox's network namespace.

Each request opens a new connection (`Connection: close`), so a lost request shows up as an error and
is never hidden by a client retry. Loads stop by themselves after `max_seconds` or `max_requests`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from clusterctl.control import sandbox as sb


@dataclass
class LoadResult:
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    bodies: Counter[bytes] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + len(self.errors)

    def p99(self) -> float:
        lat = sorted(self.latencies)
        return lat[int(len(lat) * 0.99) - 1] if lat else 0.0


def request(port: int, path: str = "/", timeout: float = 10.0, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One GET over a new connection; (status, body). Call it inside the right network namespace."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise OSError(f"bad response {data[:60]!r}")
    return int(head.split()[1]), body


class Load:
    """`with Load(sandbox, port) as load: ...` runs steady load during the block; `load.result` after."""

    def __init__(self, sandbox: str, port: int, path: str = "/", threads: int = 4, rate: float = 200.0,
                 max_seconds: float = 60.0, max_requests: int = 50_000) -> None:
        self.sandbox, self.port, self.path = sandbox, port, path
        self.threads, self.interval = threads, threads / rate
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with sb.netns(self.sandbox):
            while not self._stop.is_set() and time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    status, body = request(self.port, self.path)
                    err = None if status == 200 else f"HTTP {status}"
                except OSError as e:
                    status, body, err = 0, b"", f"{type(e).__name__}: {e}"
                dt = time.monotonic() - t0
                with self._lock:
                    r = self.result
                    if r.total >= self.max_requests:
                        return
                    if err:
                        r.errors.append(err)
                    else:
                        r.ok += 1
                        r.latencies.append(dt)
                        r.bodies[body] += 1
                    r.statuses[status] += 1
                time.sleep(max(0.0, self.interval - dt))

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        """Block until at least n requests finished (so an event happens under load, not before it)."""
        deadline = time.monotonic() + timeout
        while self.result.total < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        self.wait_for(20)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # keep the load on for a moment after the event
        self._stop.set()
        for t in self._workers:
            t.join(timeout=15)
