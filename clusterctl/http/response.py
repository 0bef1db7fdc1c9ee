"""The response side both adapters share: compiled heads and their cache, framing, keep-alive.

An adapter turns what its app answered into a (status, headers) pair and a body. `Head` is that pair
validated and compiled once (status line plus the app's headers minus hop-by-hop ones), cached per
worker in `Server.head_cache` and found again mostly by identity (`Server.heads`, the last per status).
`ResponseWriter` chooses the framing (Content-Length, chunked, close-delimited, none for HEAD/1xx/204/304)
and whether the connection is kept, and counts what was sent for the access log. The common response (one
bytes body on a kept HTTP/1.1 connection) takes `Head.full_head`: the complete head, Date and
Content-Length included, cached per body length and written with one transport.write().
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from clusterctl.http.protocol import REASONS, HttpProtocol, error_response
from clusterctl.http.request import CACHE_MAX

# The hot path calls methods through module-level names bound here: CPython 3.11 compiles `name.method()` to a
# generic, unspecializable attribute lookup when `name` was imported, and to LOAD_METHOD (or one global) when not.
_protocol_init = HttpProtocol.__init__

__all__ = ["JOIN_MAX", "NO_BODY_CODES", "REASONS", "Head", "ResponseWriter", "error_response"]

# A body under this many bytes goes out joined to its head (one write); a bigger one is written after it,
# uncopied: the transport keeps a reference until it is sent, so slow readers of one big body share it.
JOIN_MAX = 65536
NO_BODY_CODES = frozenset((204, 304))
# Framing of a response body.
F_NONE, F_LENGTH, F_CHUNKED, F_CLOSE = 0, 1, 2, 3

# Response header names: hop-by-hop or framing headers an app must not set (PEP 3333); we frame ourselves.
TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
K_PLAIN, K_CL, K_CONN, K_DROP, K_DATE = 0, 1, 2, 3, 4
_K_BY_LOWER = {b"content-length": K_CL, b"connection": K_CONN, b"transfer-encoding": K_DROP, b"keep-alive": K_DROP,
               b"date": K_DATE}
_HEAD_KIND: dict[bytes, int] = {}


def head_kind(name: bytes) -> int:
    """The K_* kind of a response header name; a name that is not an RFC 9110 token raises ValueError."""
    kind = _HEAD_KIND.get(name)
    if kind is None:
        if not name or any(c not in TOKEN for c in name):
            raise ValueError(f"invalid response header name {name!r}")
        kind = _K_BY_LOWER.get(name.lower(), K_PLAIN)
        if len(_HEAD_KIND) < CACHE_MAX:
            _HEAD_KIND[name] = kind
    return kind


def compile_head(code: int, status_line: bytes, fields: Iterable[tuple[bytes, bytes]], headers: Any) -> Head:
    """Validate an app's response header fields (as bytes, whichever interface gave them) and compile them
    after `status_line`; hop-by-hop and framing fields are dropped (we frame responses ourselves) and the app's
    Content-Length, Connection: close and Date are noted. `headers` is what the app gave, kept to recognise the
    same head next time."""
    out = [status_line]
    app_cl: int | None = None
    close = has_date = False
    for name, value in fields:
        kind = head_kind(name)
        if 0x0A in value or 0x0D in value or 0 in value:
            raise ValueError(f"response header {name!r} contains a line break")
        if kind == K_CL:
            app_cl = int(value)
        elif kind == K_CONN:
            close = b"close" in value.lower()
            continue
        elif kind == K_DROP:
            continue
        elif kind == K_DATE:
            has_date = True
        out += (name, b": ", value, b"\r\n")
    return Head(code, b"".join(out), app_cl, close, has_date, headers)


class Head:
    """A validated response head for one (status, headers), compiled once and reused.

    `plain` marks the common shape (a body allowed, no Connection or Date from the app): for it the whole
    head for a body of n bytes, Date and Content-Length included, is kept per n until the Date line changes.
    """

    __slots__ = ("app_cl", "app_close", "code", "date", "full", "has_date", "headers", "plain", "prefix")

    def __init__(self, code: int, prefix: bytes, app_cl: int | None, app_close: bool, has_date: bool,
                 headers: Any) -> None:
        self.headers = headers  # what the app gave, to recognise the same head next time
        self.prefix = prefix    # status line and the app's headers, minus hop-by-hop ones
        self.code = code
        self.app_cl = app_cl
        self.app_close = app_close
        self.has_date = has_date
        self.plain = code >= 200 and code not in NO_BODY_CODES and not app_close and not has_date
        self.date = b""
        self.full: dict[int, bytes] = {}

    def full_head(self, date: bytes, key: int) -> bytes | None:
        """The whole head of an n-byte body under this Date line, `key` n on a kept connection and ~n (< 0)
        on one that closes after it; cached per key until the line changes. None when the app's own
        Content-Length is not n (the general path truncates or closes)."""
        if self.date is not date:
            self.date = date
            self.full = {}
        full = self.full.get(key)
        if full is not None:
            return full
        n, end = (key, b"\r\n") if key >= 0 else (~key, b"connection: close\r\n\r\n")
        app_cl = self.app_cl
        if app_cl is None:
            full = self.prefix + self.date + b"content-length: %d\r\n" % n + end
        elif app_cl == n:
            full = self.prefix + self.date + end
        else:
            return None
        if len(self.full) < 256:
            self.full[key] = full
        return full


class ResponseWriter(HttpProtocol):
    """One response at a time per connection: its framing, whether the connection is kept, what was sent.

    The adapters (WSGI, ASGI) subclass it. The access log reads `t0` and `req_line` (set only while an access log
    is on) and asks `client_addr()`."""

    __slots__ = ("code", "framing", "head_sent", "is_head", "keep", "remaining", "req_line", "resp_bytes",
                 "rversion", "t0")

    def __init__(self, server: Any) -> None:
        _protocol_init(self, server)  # not super(): no super object per connection (close mode)
        self.head_sent = False
        self.framing = F_NONE
        self.remaining = -1   # F_LENGTH: body bytes still owed
        self.resp_bytes = 0
        self.keep = True
        self.is_head = False
        self.rversion = "1.1"  # the version of the request being answered (self.version: being parsed)
        self.code = 0
        self.t0 = 0.0
        self.req_line = ""

    def client_addr(self) -> str:
        """Hook for adapters: the client's address as this request sees it (proxy-aware), for the access log."""
        return ""

    def lookup_head(self, status: Any, headers: Any, compile_head: Callable[[Any, Any], Head]) -> Head:
        """The compiled head of (status, headers): the last one per status first (mostly the same list, by
        identity or a short compare), then the others by value (apps alternate a few), each compiled once.
        Unhashable parts (lists, bytearrays) are compiled every time, still correct."""
        server = self.server
        heads = server.heads
        h = heads.get(status)
        if h is not None and (h.headers is headers or h.headers == headers):
            return h
        cache = server.head_cache
        try:
            key: Any = (status, tuple(headers))
            h = cache.get(key)
        except TypeError:
            key, h = None, None
        if h is None:
            h = compile_head(status, headers)
            if key is not None:
                if len(cache) > 512:
                    cache.clear()
                    heads.clear()
                cache[key] = h
        heads[status] = h
        return h

    def framed_head(self, h: Head, body_len: int | None) -> bytes:
        """The head's bytes with its framing and connection lines: no body for 1xx, 204, 304 and HEAD; the
        app's Content-Length, else the known body length, else chunked on HTTP/1.1, else close-delimited.
        The connection is kept unless the request, the app or a drain (with nothing queued) says otherwise."""
        server = self.server
        keep = self.keep and not h.app_close and not (server.draining and not self.queue)
        code = h.code
        parts = [h.prefix, server.date_line if not h.has_date else f"server: {server.server_header}\r\n".encode()]
        if code < 200 or code in NO_BODY_CODES:
            framing = F_NONE
        elif h.app_cl is not None:
            framing = F_LENGTH
            self.remaining = h.app_cl
        elif body_len is not None:
            framing = F_LENGTH
            self.remaining = body_len
            parts.append(b"content-length: %d\r\n" % body_len)
        elif self.rversion == "1.1":
            framing = F_CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            framing = F_CLOSE
            keep = False
        if self.is_head:
            framing = F_NONE
        if not keep:
            parts.append(b"connection: close\r\n\r\n")
        elif self.rversion == "1.0":
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        self.keep = keep
        self.framing = framing
        self.head_sent = True
        self.code = code
        return b"".join(parts)

    def frame(self, chunk: bytes) -> bytes:
        """One piece of body as the framing chosen by `framed_head` sends it; counts the bytes sent."""
        framing = self.framing
        if framing == F_LENGTH:
            n = len(chunk)
            if n > self.remaining:  # app wrote more than its Content-Length: truncate, then close
                chunk = chunk[: self.remaining]
                n = self.remaining
                self.keep = False
            self.remaining -= n
            self.resp_bytes += n
            return chunk
        if framing == F_CHUNKED:
            self.resp_bytes += len(chunk)
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if framing == F_CLOSE:
            self.resp_bytes += len(chunk)
            return chunk
        return b""

    def complete(self) -> bool:
        """Whether the body sent so far completes the response's framing (F_LENGTH owed nothing more)."""
        return not (self.framing == F_LENGTH and self.remaining > 0)

    def error_head(self) -> bool:
        """An app failed: 500 if no head went out yet. Returns whether the connection can be kept (after half a
        response on the wire only closing tells the client)."""
        self.server.errors += 1
        if self.head_sent:
            return False
        self.code = 500
        self.resp_bytes = 0
        self.send(error_response(500, close=not self.keep))
        return self.keep

    def send(self, data: bytes) -> None:
        """Write to the client (from the loop thread; the threaded WSGI adapter overrides it)."""
        if not self.closed:
            self.transport.write(data)
