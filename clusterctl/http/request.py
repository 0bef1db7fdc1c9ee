"""The parsed request the HTTP layer hands an adapter, and the checks and caches for reading one.

`Request` is what `protocol.HttpProtocol` queues per message and what WSGI, ASGI, WebSocket, the proxy
layer and the --timeout monitor read. Header names keep the client's case: each reader maps them through
a bounded cache of its own (`header_kind` here, the environ keys in wsgi.py), so no name is lowered per
request. Every cache in this package is bounded by `CACHE_MAX`: a client sending endless new names or
targets gets no memory.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

CACHE_MAX = 4096


class Request:
    """One parsed request. Made with `Request()` and slot stores on the hot path (no __init__ of its own: a
    Python-level __init__ costs a frame per request; `make` is for the rest); `body` is None for a streamed
    body, which follows through the adapter's stream_chunk()/stream_end()."""

    __slots__ = ("body", "cl_given", "headers", "keep_alive", "method", "target", "version")

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # (name as sent, value), in order
    body: bytes | None
    keep_alive: bool                    # the client's wish (Connection, version); the server may still close
    version: str                        # "1.1" or "1.0"
    cl_given: bool                      # a Content-Length header was sent (even "0")

    @classmethod
    def make(cls, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None,
             keep_alive: bool = True, version: str = "1.1", cl_given: bool = False) -> Request:
        req = cls()
        req.method, req.target, req.headers, req.body = method, target, headers, body
        req.keep_alive, req.version, req.cl_given = keep_alive, version, cl_given
        return req

    def __repr__(self) -> str:
        return f"<Request {self.method.decode('latin-1')} {self.target.decode('latin-1')} HTTP/{self.version}>"


class Reject(Exception):
    """Raised inside a parser callback (or by a check below): answer `status` and close the connection."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


# -- header kinds: the request headers the HTTP layer itself looks at ------------------------------------
H_HOST, H_CL, H_EXPECT, H_TE, H_HOST_DUP, H_CT, H_BAD = 1, 2, 4, 8, 16, 32, 64
HKIND: dict[bytes, int] = {}  # name as sent -> kind (0: none of ours)
_HKIND_BY_LOWER = {b"host": H_HOST, b"content-length": H_CL, b"expect": H_EXPECT, b"transfer-encoding": H_TE,
                   b"content-type": H_CT, b"content_length": H_BAD, b"transfer_encoding": H_BAD}


def header_kind(name: bytes) -> int:
    """The H_* kind of a header name (filling `HKIND`, which callers read first)."""
    kind = _HKIND_BY_LOWER.get(name.lower(), 0)
    if len(HKIND) < CACHE_MAX:
        HKIND[name] = kind
    return kind


def head_size(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(n) + len(v) + 4 for n, v in headers)


# -- Host (RFC 9110 7.2: uri-host [":" port], RFC 3986 host syntax) ----------------------------------------
GOOD_HOSTS: dict[bytes, bool] = {}  # values once found valid
_REG_NAME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%")
_IP_LITERAL = frozenset(b"0123456789abcdefABCDEF:.vV-_~!$&'()*+,;=")


def check_host(host: bytes) -> None:
    """Accept `uri-host [":" port]` (a reg-name or IPv4, or an [IP-literal]); anything else is a 400: no
    userinfo (`user@host`), no path (`host/x`), no second host (`a, b`), not empty."""
    if host in GOOD_HOSTS:
        return
    name, port = host, b""
    if host[:1] == b"[":
        end = host.find(b"]")
        if end < 2 or not set(host[1:end]) <= _IP_LITERAL:
            raise Reject(400, "invalid Host header")
        rest = host[end + 1:]
        if rest and (rest[:1] != b":" or not rest[1:].isdigit()):
            raise Reject(400, "invalid Host header")
    else:
        name, _, port = host.partition(b":")
        if not name or not set(name) <= _REG_NAME or (port and not port.isdigit()) or (b":" in port):
            raise Reject(400, "invalid Host header")
        if host.endswith(b":"):
            raise Reject(400, "invalid Host header")
    if len(GOOD_HOSTS) < CACHE_MAX:
        GOOD_HOSTS[host] = True


# -- method and target, as the adapters read them ----------------------------------------------------------
METHODS: dict[bytes, str] = {}
# Request target -> (PATH_INFO, QUERY_STRING, RAW_URI): most traffic hits few URLs.
TARGETS: dict[bytes, tuple[str, str, str]] = {}
_PERCENT, _HASH = 0x25, 0x23  # `int in bytes`: `b"%" in x` costs a TypeError in CPython 3.11


def method_name(method: bytes) -> str:
    """The method as str (read `METHODS` first)."""
    m = method.decode("ascii")
    if len(METHODS) < 64:
        METHODS[method] = m
    return m


def split_target(target: bytes) -> tuple[str, str, str]:
    """(path percent-decoded as latin-1, query, raw target) of a request target (read `TARGETS` first)."""
    path, _, query = target.partition(b"?")
    if path[:1] != b"/":
        if path == b"*":
            path = b""
        else:  # absolute-form: http://host/path
            _, _, rest = path.partition(b"://")
            _, slash, p = rest.partition(b"/")
            path = slash + p if slash else b"/"
    if _HASH in query:
        query = query.partition(b"#")[0]
    elif not query and _HASH in path:
        path = path.partition(b"#")[0]
    t = ((unquote_to_bytes(path) if _PERCENT in path else path).decode("latin-1"), query.decode("latin-1"),
         target.decode("latin-1"))
    if len(TARGETS) >= CACHE_MAX:
        TARGETS.clear()
    TARGETS[target] = t
    return t
