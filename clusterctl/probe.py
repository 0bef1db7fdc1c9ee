"""The readiness/health probe's HTTP exchange, in one place (stdlib only): the worker asks its app before
READY=1 (--ready-path, over a socketpair), `clusterctl reload --health-url` asks the cluster through its
socket. Both send this request and read the answer the same way."""

from __future__ import annotations


def request(path: str) -> bytes:
    """A GET of `path` that asks the server to close afterwards (one probe, one connection)."""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


def answer(head: bytes) -> str:
    """The status line's code and reason (`200 OK`) of the bytes received so far, or `no response`."""
    line = head.partition(b"\r\n")[0].decode("latin-1")
    return line.partition(" ")[2] or "no response"


def healthy(text: str) -> bool:
    """Whether an `answer` is a 2xx."""
    return text[:1] == "2"
