"""Our HTTP/1.1 engine: httptools (llhttp, Node's parser) on an asyncio/uvloop protocol, calling WSGI inline.

Two layers, kept apart so an ASGI adapter (issue 10) can reuse the first:

* `HttpProtocol` owns the wire: parser callbacks, limits (414/431/413), timeouts (idle keep-alive,
  slow headers, slow body, stalled writes), smuggling shapes (llhttp rejects CL+TE, duplicate CL,
  obs-fold, bare LF, bad chunk sizes; we add Host and version checks), pipelining in order,
  keep-alive, flow control in both directions, and a connection limit. A parse error answers 400 after
  the requests already read and closes: nothing after it on that connection is ever processed.
* `WsgiProtocol` turns one parsed request into a PEP 3333 call and frames the response
  (Content-Length when known, chunked otherwise, HEAD/204/304 without a body, sendfile for
  `wsgi.file_wrapper`).

Lifecycle (signals, notify, drain deadline) lives in runtime.py; `Server` here only offers the hooks
(`begin_drain`, `force_close`, counters) it needs. By default a WSGI app runs inline on the event loop's
thread, one request at a time, as under a sync server: that is what makes it fast. The runtime hides the
running loop from everything but coroutines (`hide_running_loop`), so app code sees none and Django's
ORM, asgiref's async_to_sync, Flask's async views and asyncio.run() inside a view behave as under
gunicorn's sync worker. A streamed response (an iterable of unknown length) is sent one chunk per loop
turn, so each chunk is flushed, a client that left is noticed and the iterable closed, and no other
request's app code runs in between (the app is one "slot" per worker: requests that arrive meanwhile
wait for it). `Server.app_req` and `Server.beats` let
the runtime's monitor thread tell a long request (--timeout) from a stuck loop (the systemd watchdog).
`threads > 0` runs requests in a thread pool instead, for apps that block on I/O.

Hot path notes (measured in instructions per request, bench/bench_engine_cpu.py and bench/RESULTS.md):
protocols use __slots__; header names stay as sent and go through bounded caches (HTTP-layer kind bits,
environ keys); the environ is a copy of a per-connection base dict; the common response (one bytes body,
keep-alive HTTP/1.1) takes one fast path whose complete head (Date and Content-Length included) is
cached per body length and sent with one transport.write(); no clock reads or timers per request (one
periodic sweep handles timeouts and the Date line); `int in bytes`, never `b"x" in bytes` (CPython 3.11
raises and clears a TypeError inside the latter).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

_set_running_loop = asyncio._set_running_loop  # type: ignore[attr-defined]


class _Visible(Coroutine[Any, Any, Any]):
    """A coroutine that sees its running loop only while it runs a step (see `hide_running_loop`)."""

    __slots__ = ("coro", "loop")

    def __init__(self, coro: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.coro = coro
        self.loop = loop

    def send(self, value: Any) -> Any:
        _set_running_loop(self.loop)
        try:
            return self.coro.send(value)
        finally:
            _set_running_loop(None)

    def throw(self, *args: Any) -> Any:
        _set_running_loop(self.loop)
        try:
            return self.coro.throw(*args)
        finally:
            _set_running_loop(None)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def __getattr__(self, name: str) -> Any:  # cr_frame, __qualname__ ...: what asyncio's repr and debug read
        return getattr(self.coro, name)


def _visible_task(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
    return asyncio.Task(_Visible(coro, loop), loop=loop, **kw)


def hide_running_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run WSGI app code as under a sync server: no running event loop visible to it, so Django's
    async-unsafe checks, asgiref's async_to_sync, Flask's async views and asyncio.run() in a view work.

    The loop is hidden from every callback (protocol callbacks, where the app runs, timers) and shown only
    to coroutines, each step of which a task factory wraps. In a WSGI worker coroutines are the runtime's own
    (start-up, readiness probe, hand-over), so the price is paid a few times per process instead of twice per
    request: on CPython 3.11 each `_set_running_loop` allocates and calls getpid(), a system call (~0.25 us on
    these VMs; bench/RESULTS.md). Call before run_until_complete: the first task step hides it."""
    loop.set_task_factory(_visible_task)

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(now: float) -> str:
    """RFC 9110 IMF-fixdate, without importing the email package (a worker's resident memory counts)."""
    t = time.gmtime(now)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")

log = logging.getLogger("clusterctl.engine")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(slots=True)
class Limits:
    """Per-request limits and per-connection timeouts (seconds). Defaults follow nginx/gunicorn."""

    keepalive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_request_line: int = 8190
    max_header_field: int = 8190  # one field line, name and value (gunicorn's limit; nginx's 8 KB buffers)
    max_header_size: int = 32768
    max_headers: int = 100
    max_body_size: int = 16 * 1024 * 1024
    max_connections: int = 2048
    # A body may take body_timeout plus 1 s per min_body_rate bytes received (Apache mod_reqtimeout's MinRate):
    # a client trickling a byte every few seconds no longer keeps its slot forever.
    min_body_rate: int = 500
    # Request body bytes buffered across all connections of the worker (WSGI bodies are read whole before the
    # app runs): a body that would take the worker past it is answered 503, so 50 stalled uploads cannot hold
    # 50 x --max-body-size of memory.
    max_buffered: int = 128 * 1024 * 1024


# Connection phases, for timeouts (what we are waiting for from the client when not busy).
IDLE, HEAD, BODY = 0, 1, 2

_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _canned(code: int, close: bool = True, extra: str = "") -> bytes:
    reason = _REASONS.get(code, "Error")
    body = f"{code} {reason}\n".encode()
    head = (f"HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\n{extra}" + ("connection: close\r\n" if close else "") + "\r\n")
    return head.encode("latin-1") + body


class _Reject(Exception):
    """Raised inside a parser callback: answer `status` and close the connection."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


# Request tuple handed from the HTTP layer to an adapter:
# (method, target, headers[(name as sent, value)], body, keep_alive, version, content_length_given).
# Names keep the client's case: an adapter maps them through its own cache (WSGI: environ keys).
# body is None for a streamed request (adapters with `stream_bodies`): its body follows through
# stream_chunk()/stream_end(), read from the socket only as fast as the app consumes it.
Request = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool, str, bool]


class Server:
    """State shared by all connections of one worker: limits, counters, clock, drain flag."""

    def __init__(self, app: WSGIApp, loop: asyncio.AbstractEventLoop, limits: Limits | None = None, *,
                 threads: int = 0, access_log: Callable[..., None] | None = None,
                 server_header: str = "clusterctl") -> None:
        self.app = app
        self.loop = loop
        self.limits = limits or Limits()
        self.threads = threads
        if threads > 0:  # imported here: most workers run the app inline and never pay for it
            from concurrent.futures import ThreadPoolExecutor

            self.executor: Any = ThreadPoolExecutor(threads, thread_name_prefix="wsgi")
        else:
            self.executor = None
        self.access_log = access_log
        self.server_header = server_header
        self.connections: set[HttpProtocol] = set()
        self.served = 0
        self.errors = 0
        self.in_flight = 0
        self.rejected = 0
        self.trusted: Any = None  # proxy.Trusted, from behind_proxy()
        self.proxy_protocol = False
        self.buffered = 0  # request body bytes held by connections still receiving them (Limits.max_buffered)
        self.draining = False
        self.clock = loop.time()
        self._second = -1
        self.date_line = b""
        self.head_cache: dict[Any, Any] = {}  # (status, headers) -> compiled head (engine adapters' own)
        self.heads: dict[str, Any] = {}  # status -> the last head compiled for it
        self.env_bases: dict[Any, dict[str, Any]] = {}  # WSGI: local address -> the environ's fixed part
        self.listeners: list[asyncio.AbstractServer] = []
        self.loop_thread = threading.get_ident()
        # WSGI app slot (inline mode): the request whose app code runs on the loop thread right now (read by the
        # runtime's monitor thread to name a request over --timeout), the connection whose streamed response
        # holds the slot between loop turns, the requests waiting for it, and, with --threads, each request
        # thread's (request, start time).
        self.app_req: Request | None = None
        self.app_owner: HttpProtocol | None = None
        self.app_waiting: deque[tuple[Any, Request, bool]] = deque()
        self.running: dict[int, tuple[Request, float]] = {}
        self.beats = 0  # +1 per housekeeping tick: the monitor tells a blocked loop from a quiet one
        self.app_steps = 0  # +1 per streamed chunk: the monitor times each chunk, not the whole stream
        self.recycle_at = -1  # served count at which on_recycle fires (--max-requests)
        self.on_recycle: Callable[[], None] | None = None
        self._ticker: asyncio.TimerHandle | None = None
        lim = self.limits
        self.tick_interval = max(0.02, min(1.0, lim.keepalive_timeout / 4, lim.header_timeout / 4,
                                           lim.body_timeout / 4))
        self._update_date()

    protocol_class: type[HttpProtocol]  # set below the classes; behind_proxy() swaps in a proxied subclass

    def protocol(self) -> HttpProtocol:
        return self.protocol_class(self)

    def behind_proxy(self, trusted: Any, proxy_protocol: bool) -> None:
        """--forwarded-allow-ips (a proxy.Trusted) / --proxy-protocol. Connections get a subclass that reads the
        PROXY header and the trusted forwarded headers; with neither set the plain class runs, at no cost (and
        proxy.py is never imported)."""
        self.trusted = trusted
        self.proxy_protocol = proxy_protocol
        if trusted is not None or proxy_protocol:
            from clusterctl.proxy import proxied

            self.protocol_class = proxied(type(self).protocol_class)

    async def serve(self, socks: list[Any], backlog: int = 4096) -> None:
        """Serve the given listening sockets (never re-bound; listen() only re-applies `backlog`)."""
        for sock in socks:
            if sock.family == socket.AF_UNIX:
                srv = await self.loop.create_unix_server(self.protocol, sock=sock, backlog=backlog)
            else:
                srv = await self.loop.create_server(self.protocol, sock=sock, backlog=backlog)
            self.listeners.append(srv)
        self._tick()

    # -- housekeeping: one timer per worker, not one per connection -------------------------------------
    def _update_date(self) -> None:
        now = time.time()
        sec = int(now)
        if sec != self._second:
            self._second = sec
            self.date_line = (f"date: {http_date(now)}\r\nserver: {self.server_header}\r\n"
                              ).encode("latin-1")

    def _tick(self) -> None:
        self.beats += 1
        self.clock = now = self.loop.time()
        self._update_date()
        lim = self.limits
        for conn in list(self.connections):
            conn.check_timeout(now, lim)
        self._ticker = self.loop.call_later(self.tick_interval, self._tick)

    def make_room(self, newcomer: HttpProtocol) -> bool:
        """At the connection cap, free a slot for a new client instead of refusing it: first the longest idle
        keep-alive connection, else the connection that has waited longest on its own client (a silent one, a
        slow head, a trickled body, an ASGI app's streamed body). A request the app is working on is never taken."""
        idle: HttpProtocol | None = None
        slow: HttpProtocol | None = None
        for conn in self.connections:
            if conn is newcomer or conn.closed:
                continue
            if conn.lingering:  # an error answer being flushed: the cheapest to let go
                conn.close()
                return True
            if conn.busy:
                if conn.streaming and not conn.body_held and (slow is None or conn.since < slow.since):
                    slow = conn
            elif conn.phase == IDLE:
                if not conn.queue and (idle is None or conn.since < idle.since):
                    idle = conn
            elif slow is None or conn.since < slow.since:
                slow = conn
        if idle is not None:
            idle.close()
            return True
        if slow is None:
            return False
        if slow.got_bytes:
            slow._fail(_Reject(503, "connections ran short: the slowest client makes room"))
            if not slow.closed:
                slow.close()
        else:
            slow.close()
        return True

    def run_waiting(self) -> None:
        """Requests that waited while a streamed response held the app slot, in arrival order."""
        waiting = self.app_waiting
        while waiting and self.app_owner is None:
            conn, req, keep_alive = waiting.popleft()
            if conn.closed:  # the client left while it waited: nothing to answer
                conn.busy = False
                self.in_flight -= 1
                continue
            conn.handle(req, keep_alive)

    # -- drain hooks for the runtime ----------------------------------------------------------------------
    def stop_accepting(self) -> None:
        for srv in self.listeners:
            srv.close()

    def begin_drain(self) -> None:
        """Stop accepting; close idle keep-alive connections; busy ones close after their response."""
        self.draining = True
        self.stop_accepting()
        for conn in list(self.connections):
            conn.drain()

    def force_close(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    def close(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        if self.executor:
            self.executor.shutdown(wait=False, cancel_futures=True)


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 wire protocol; subclasses implement `handle(request)` and call `finish()` when done."""

    # Slots: with more than 30 attributes CPython 3.11 stops sharing instance-dict keys and every
    # self.x becomes a dict lookup; slot access is a fixed offset.
    __slots__ = ("big_read", "body", "body_held", "body_len", "busy", "closed", "continue_pending", "error", "expect",
                 "good_host", "got_bytes", "head_carry", "head_limit", "headers", "hflags", "in_head", "limits",
                 "lingering", "loop",
                 "max_field", "max_header_size", "max_headers", "max_request_line", "measure", "parser", "phase",
                 "queue", "read_big", "read_paused", "req_headers", "running_queue", "server", "since", "stop_parsing",
                 "streaming", "trailing", "transport", "url", "version", "writable", "write_paused")

    # True: a request with a body that arrives while the connection is idle is handed to the adapter at the
    # end of its head, and the body follows as it is read (ASGI's http.request with more_body). False: the
    # body is read whole first, bounded by --max-body-size (WSGI apps read wsgi.input synchronously).
    stream_bodies = False

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.busy = False
        self.closed = False
        self.stop_parsing = False     # after an error/upgrade/close: never look at further bytes
        self.error: _Reject | None = None
        self.write_paused = False
        self.read_paused = False
        self.running_queue = False
        self.phase = HEAD
        self.since = server.clock
        self.got_bytes = False
        self.head_carry = 0
        self.in_head = False
        self.continue_pending = False
        self.lingering = False
        # Set while the transport takes writes; only --threads' worker threads wait on it, so only a threaded
        # adapter makes one (a threading.Event and its Condition cost ~10% of a Connection: close request).
        self.writable: threading.Event | None = None
        lim = self.limits
        self.head_limit = lim.max_request_line + lim.max_header_size + 1024
        self.max_header_size = lim.max_header_size
        self.max_headers = lim.max_headers
        self.max_request_line = lim.max_request_line
        self.max_field = lim.max_header_field
        # A read no larger than this cannot hold a field or a head over the limits: only bigger reads, or heads
        # that span reads, get measured (once, in on_headers_complete).
        self.big_read = min(lim.max_header_field, lim.max_header_size)
        self.read_big = False         # this read alone could hold a head or a field over the limits
        self.measure = False          # this message's head needs its size checked
        self.version = "1.1"
        # per-message state
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.hflags = 0               # _H_* bits seen in this head
        self.good_host = b"\x00"      # the last Host value this connection sent that was valid
        # A chunked request's trailer section: its fields go to a list of their own (self.headers, swapped in
        # on_headers_complete) that is bounded like a head and then dropped, never merged into the request.
        self.trailing = False
        self.req_headers: list[tuple[bytes, bytes]] = _NO_HEADERS  # read only while trailing
        self.expect = b""             # valid only while hflags & _H_EXPECT
        self.body: list[bytes] | None = None
        self.body_len = 0
        self.streaming = False        # the request being handled still has body to come
        self.body_held = False        # reading paused until the adapter's app consumes the body read so far

    # -- transport callbacks ------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        server = self.server
        server.connections.add(self)
        if len(server.connections) > self.limits.max_connections and not server.make_room(self):
            server.rejected += 1
            self.stop_parsing = True
            transport.write(_canned(503, extra="retry-after: 1\r\n"))
            self.close()
            return
        self.setup(transport)

    def setup(self, transport: Any) -> None:
        """Hook for adapters: per-connection state derived from the socket."""

    def _unbuffer(self) -> None:
        """A body that will never complete stops counting against --max-buffered."""
        if self.body is not None:
            self.server.buffered -= self.body_len
            self.body = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._unbuffer()
        self.closed = True
        self.stop_parsing = True
        self.server.connections.discard(self)
        # The parser refers back to us: dropping it lets reference counting free a closed connection at once
        # instead of the cyclic collector later. No data can arrive any more (stop_parsing), so nothing parses
        # after this.
        self.parser = None
        if self.writable is not None:
            self.writable.set()
        self.on_lost()

    def on_lost(self) -> None:
        """Hook for adapters: the client went away (possibly mid-response)."""

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.writable is not None:
            self.writable.clear()
        self.since = self.server.clock

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.writable is not None:
            self.writable.set()
        self.on_writable()

    def on_writable(self) -> None:
        if not self.busy:
            self.run_queue()

    def data_received(self, data: bytes) -> None:
        if self.stop_parsing:
            return
        self.got_bytes = True
        n = len(data)
        # A head that fits in one read no larger than max_header_size cannot exceed it: only heads that
        # span reads or arrive in a big read get their size summed (once, in on_headers_complete).
        self.read_big = n > self.big_read
        if self.in_head or self.trailing:  # a head (or trailers) that began in an earlier read (on_url resets the count)
            self.head_carry += n
            self.measure = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # llhttp stops at a request that asks to switch protocols; e.args[0]: where its head ends in `data`.
            self.on_upgrade(data[e.args[0]:] if e.args and isinstance(e.args[0], int) else b"")
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            self._fail(ctx if isinstance(ctx, _Reject) else _Reject(400, str(ctx or e)))
            return
        except (httptools.HttpParserError, httptools.HttpParserInvalidMethodError,
                httptools.HttpParserInvalidURLError) as e:
            self._fail(_Reject(400, str(e)))
            return
        if (self.in_head or self.trailing) and self._head_over():
            return
        queue = self.queue
        if len(queue) > 16 and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        if queue and not self.busy:
            self.run_queue()

    def on_upgrade(self, rest: bytes) -> None:
        """Hook for adapters (ASGI WebSockets): the last queued request asks to switch protocols and `rest`
        are the bytes after its head. Plain HTTP/1.1 here: answer the request, ignore the upgrade, close."""
        self.stop_parsing = True
        if self.queue:
            self.queue[-1] = (*self.queue[-1][:4], False, *self.queue[-1][5:])  # type: ignore[assignment]

    def _head_over(self) -> bool:
        """Bound an unfinished head or trailer section (llhttp buffers a partial header line without calling us)."""
        headers = self.headers
        if (self.head_carry > self.head_limit or len(headers) > self.max_headers
                or (self.measure and _head_size(headers) > self.max_header_size)):
            self.headers = []
            self._fail(_Reject(431, "request trailers too large" if self.trailing else "request head too large"))
            return True
        return False

    def eof_received(self) -> bool | None:
        # Half-close from the client: answer what was read (run_queue closes after), then close.
        self.stop_parsing = True
        if (not self.busy and not self.queue) or self.lingering:
            return None
        return True

    # -- parser callbacks ---------------------------------------------------------------------------------
    # No on_message_begin: httptools calls only the callbacks a protocol defines, and one C -> Python call
    # per request is saved by starting the message at its URL, the first callback of every request.
    def on_url(self, url: bytes) -> None:
        if self.in_head:  # the URL goes on from an earlier read
            url = self.url + url
        else:  # a new message
            self.headers = []
            self.hflags = 0
            self.body = None
            self.body_len = 0
            self.in_head = True
            self.head_carry = 0
            self.measure = self.read_big
            self.phase = HEAD
            self.since = self.server.clock
        self.url = url
        if len(url) > self.max_request_line:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Names stay as sent (no .lower() per header); the few that matter here are found by a cache.
        self.headers.append((name, value))
        kind = _HKIND.get(name)
        if kind is None:
            kind = _header_kind(name)
        if kind:
            if kind == _H_HOST and not self.hflags & _H_HOST:  # the one every request has, without a call
                self.hflags |= _H_HOST
                if value != self.good_host:  # checked once per connection while it sends the same one
                    self._host_seen(value)
            else:
                self._special_header(kind, value, name)

    def _special_header(self, kind: int, value: bytes, name: bytes = b"") -> None:
        if kind == _H_HOST:
            self.hflags |= _H_HOST_DUP if self.hflags & _H_HOST else _H_HOST
        elif kind == _H_CL:
            self.hflags |= _H_CL
            if not value.isdigit():
                raise _Reject(400, "invalid Content-Length")
            if int(value) > self.limits.max_body_size:
                raise _Reject(413, "body larger than --max-body-size")
        elif kind == _H_EXPECT:
            self.hflags |= _H_EXPECT
            self.expect = value.lower()
        elif kind == _H_TE:
            self.hflags |= _H_TE
        elif kind == _H_CT:
            if self.hflags & _H_CT:
                raise _Reject(400, "more than one Content-Type header")
            self.hflags |= _H_CT
        else:  # Transfer_Encoding, Content_Length: a framing header in disguise (an environ key would alias it)
            raise _Reject(400, f"invalid header name {name!r}")

    def on_headers_complete(self) -> None:
        headers = self.headers
        if len(headers) > self.max_headers:
            raise _Reject(431, "too many request headers")
        if self.measure:
            if _head_size(headers) > self.max_header_size:
                raise _Reject(431, "request headers too large")
            limit = self.max_field
            for name, value in headers:
                if len(name) + len(value) > limit:
                    raise _Reject(431, "a request header field is too large")
        self.in_head = False
        self.phase = BODY
        self.version = version = self.parser.get_http_version()
        hf = self.hflags
        if version == "1.1":
            if hf & (_H_HOST | _H_HOST_DUP) != _H_HOST:
                raise _Reject(400, "HTTP/1.1 request needs exactly one Host header")
        elif version == "1.0":
            if hf & _H_TE:
                raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            if hf & _H_HOST_DUP:
                raise _Reject(400, "more than one Host header")
        else:
            raise _Reject(505 if version[:1] > "1" else 400, f"HTTP/{version} not supported")
        if self.url[0] != 47:  # not origin-form ("/..."): asterisk, absolute or authority form
            self._other_target_form(headers)
        if hf & _H_TE:  # chunked: trailers go to a list of their own, bounded, then dropped
            self.req_headers = headers
            self.headers = []
            self.trailing = True
            self.head_carry = 0
            self.measure = False
        if hf & (_H_CL | _H_TE):
            self.since = self.server.clock  # a body follows: the body timeout starts now
            expects = False
            if hf & _H_EXPECT:
                if self.expect != b"100-continue":
                    raise _Reject(417, "unsupported Expect")
                expects = version == "1.1"
            if self.stream_bodies and not (self.busy or self.queue):
                self.continue_pending = expects  # the adapter sends 100 Continue when the app first reads
                self._dispatch_streamed()
            elif expects:
                if self.busy or self.queue:
                    self.continue_pending = True
                else:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif hf & _H_EXPECT and self.expect != b"100-continue":
            raise _Reject(417, "unsupported Expect")

    def _host_seen(self, host: bytes) -> None:
        """Check a Host value that is not the connection's last valid one (RFC 9110 7.2), else 400."""
        if host not in _GOOD_HOSTS:  # _check_host looks too; here it saves a call per connection (close mode)
            _check_host(host)
        self.good_host = host

    def _other_target_form(self, headers: list[tuple[bytes, bytes]]) -> None:
        """`*` (OPTIONS only), absolute-form (its authority replaces Host, RFC 9112 3.2.2) or CONNECT."""
        url = self.url
        method = self.parser.get_method()
        if method == b"CONNECT":
            raise _Reject(501, "CONNECT is not served")
        if url == b"*":
            if method != b"OPTIONS":
                raise _Reject(400, "the asterisk target is for OPTIONS only")
            return
        scheme, sep, rest = url.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise _Reject(400, "invalid request target")
        authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
        _check_host(authority)
        for i, (name, _) in enumerate(headers):
            if _HKIND.get(name) == _H_HOST:
                headers[i] = (name, authority)

    def _dispatch_streamed(self) -> None:
        """Hand the request to the adapter now; its body follows through stream_chunk()/stream_end()."""
        parser = self.parser
        keep = parser.should_keep_alive()
        self.streaming = True
        self.busy = True
        server = self.server
        server.in_flight += 1
        headers = self.req_headers if self.trailing else self.headers
        self.handle((parser.get_method(), self.url, headers, None, keep, self.version, self.hflags & _H_CL != 0),
                    keep and not server.draining)

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)  # reset per message in on_url
        self.head_carry = 0  # body bytes, not trailers (counted in data_received only while trailing)
        if self.streaming:
            if self.body_len > self.limits.max_body_size:
                raise _Reject(413, "body larger than --max-body-size")
            self.stream_chunk(body)
            return
        if self.body is None:
            self.body = [body]
        else:
            self.body.append(body)
        server = self.server
        server.buffered += len(body)  # body_len of them is counted back by on_message_complete or _unbuffer
        if self.body_len > self.limits.max_body_size:
            raise _Reject(413, "body larger than --max-body-size")
        if server.buffered > self.limits.max_buffered:
            raise _Reject(503, "the worker's buffered request bodies are over --max-buffered")

    def on_message_complete(self) -> None:
        # No clock update here: a queued request is never timed out, and finish() restarts the idle clock.
        headers = self.headers
        if self.trailing:  # the trailer fields are bounded like a head (431) and dropped (README: HTTP limits)
            self.trailing = False
            if len(headers) > self.max_headers or _head_size(headers) > self.max_header_size:
                raise _Reject(431, "request trailers too large")
            headers = self.headers = self.req_headers
        if self.streaming:
            self.streaming = False
            self.in_head = False
            self.continue_pending = False
            self.phase = IDLE
            self.stream_end()
            return
        body = self.body
        if body is not None:
            self.server.buffered -= self.body_len  # handed over: the request owns it now
            self.body = None
        parser = self.parser
        self.queue.append((
            parser.get_method(), self.url, headers,
            b"" if body is None else body[0] if len(body) == 1 else b"".join(body),
            parser.should_keep_alive(), self.version, self.hflags & _H_CL != 0,
        ))
        self.in_head = False
        self.continue_pending = False
        self.phase = IDLE

    # -- request sequencing ----------------------------------------------------------------------------------
    def run_queue(self) -> None:
        """Answer queued requests in order while nothing is in progress and the client keeps reading."""
        if self.running_queue:
            return
        self.running_queue = True
        queue = self.queue
        server = self.server
        try:
            while queue and not (self.busy or self.closed or self.write_paused):
                req = queue.popleft()
                self.busy = True
                server.in_flight += 1
                self.handle(req, req[4] and not (server.draining and not queue))
        finally:
            self.running_queue = False
        if self.busy or self.closed or self.write_paused or queue:
            return
        if self.error is not None:
            self._send_error()
        elif self.stop_parsing:
            self.close()
        else:
            if self.read_paused:
                self.read_paused = False
                self.transport.resume_reading()
            if self.continue_pending:
                self.continue_pending = False
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def handle(self, req: Request, keep_alive: bool) -> None:
        raise NotImplementedError

    # -- streamed bodies (adapters with stream_bodies) -------------------------------------------------------
    def stream_chunk(self, chunk: bytes) -> None:
        """A piece of the streamed request's body."""
        raise NotImplementedError

    def stream_end(self) -> None:
        """The streamed request's body is complete."""
        raise NotImplementedError

    def stream_abort(self) -> None:
        """The streamed body broke (self.error says how): the app must hear it; the adapter ends the request
        with finish(): the HTTP layer then sends the error response, or closes if the app's response began."""
        raise NotImplementedError

    def hold_body(self) -> None:
        """Stop reading: the app has not consumed what was read of the body (flow control)."""
        if not self.body_held and not self.closed:
            self.body_held = True
            self.transport.pause_reading()

    def release_body(self) -> None:
        if self.body_held:
            self.body_held = False
            self.since = self.server.clock  # the body timeout measures the client, not the app
            if not (self.closed or self.read_paused):
                self.transport.resume_reading()

    def finish(self, keep_alive: bool) -> None:
        """The adapter's response is complete (called on the loop thread)."""
        self.busy = False
        if self.streaming:  # answered before the body was read: closing is cheaper than reading it to discard
            self.streaming = False
            self.release_body()
            keep_alive = False
        server = self.server
        server.in_flight -= 1
        server.served += 1
        if server.served == server.recycle_at and server.on_recycle is not None:
            server.on_recycle()
        if not keep_alive or (server.draining and not self.queue and self.phase == IDLE):
            self.queue.clear()
            self.stop_parsing = True
            self.close()
            return
        if self.phase == IDLE:
            self.since = server.clock
        if not self.running_queue:
            self.run_queue()

    # -- errors, timeouts, drain ------------------------------------------------------------------------------
    def _fail(self, err: _Reject) -> None:
        self._unbuffer()
        self.stop_parsing = True
        self.error = err
        if self.streaming:
            self.streaming = False
            self.stream_abort()
        elif not self.busy and not self.queue:
            self._send_error()
        elif not self.busy:
            self.run_queue()

    def _send_error(self) -> None:
        err = self.error
        if err is None or self.closed:
            return
        self.error = None
        self.server.errors += 1
        log.debug("rejecting request: %d %s", err.status, err)
        self.transport.write(_canned(err.status))
        self.linger()

    def linger(self) -> None:
        """Close after an error without losing the error response to a TCP reset.

        Closing with unread request bytes in the kernel buffer makes Linux send RST, and the client may
        then drop our response unread. So: send FIN (write_eof), discard what still arrives, and close
        when the client does or after a second (nginx's lingering close).
        """
        self.stop_parsing = True
        self.lingering = True
        self.phase = IDLE
        self.since = self.server.clock
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
                return
        except (OSError, RuntimeError):
            pass
        self.close()

    def check_timeout(self, now: float, lim: Limits) -> None:
        if self.lingering:
            if now - self.since > 1.0:
                self.close()
            return
        if self.write_paused:
            if now - self.since > lim.body_timeout:
                self.abort()
            return
        if (self.streaming and not self.body_held
                and now - self.since > lim.body_timeout + self.body_len / lim.min_body_rate):
            self._fail(_Reject(408, "request body not received in time"))
            return
        if self.busy or self.closed:
            return
        phase = self.phase
        if self.server.draining and phase == HEAD and not self.got_bytes and now - self.since > 1.0:
            self.close()  # a connection that never sent anything does not hold up the drain
            return
        if phase == IDLE:
            if self.queue:
                return
            if now - self.since > lim.keepalive_timeout:
                self.close()
        elif phase == HEAD:
            if now - self.since > lim.header_timeout:
                if self.got_bytes:
                    self._fail(_Reject(408, "request head not received in time"))
                else:
                    self.close()
        elif now - self.since > lim.body_timeout + self.body_len / lim.min_body_rate:
            self._fail(_Reject(408, "request body not received in time"))

    def drain(self) -> None:
        """Called once when the worker starts draining."""
        if not self.busy and not self.queue and self.phase == IDLE and self.got_bytes:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stop_parsing = True
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.stop_parsing = True
        if self.transport is not None:
            self.transport.abort()

    def _framed_head(self, prefix: bytes, has_date: bool, code: int, app_cl: int | None, body_len: int | None,
                     keep: bool) -> bytes:
        """The head's framing and connection lines, shared by the WSGI and ASGI adapters: no body for 1xx, 204,
        304 and HEAD; the app's Content-Length, else the known body length, else chunked on HTTP/1.1, else
        close-delimited."""
        parts = [prefix, self.server.date_line if not has_date else f"server: {self.server.server_header}\r\n".encode()]
        if code < 200 or code in _NO_BODY_CODES:
            framing = _F_NONE
        elif app_cl is not None:
            framing = _F_LENGTH
            self.remaining = app_cl
        elif body_len is not None:
            framing = _F_LENGTH
            self.remaining = body_len
            parts.append(b"content-length: %d\r\n" % body_len)
        elif self.rversion == "1.1":
            framing = _F_CHUNKED
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            framing = _F_CLOSE
            keep = False
        if self.is_head:
            framing = _F_NONE
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

    def _frame(self, chunk: bytes) -> bytes:
        """One piece of body as the framing chosen by `_framed_head` sends it; counts the bytes sent."""
        framing = self.framing
        if framing == _F_LENGTH:
            n = len(chunk)
            if n > self.remaining:  # app wrote more than its Content-Length: truncate, then close
                chunk = chunk[: self.remaining]
                n = self.remaining
                self.keep = False
            self.remaining -= n
            self.resp_bytes += n
            return chunk
        if framing == _F_CHUNKED:
            self.resp_bytes += len(chunk)
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if framing == _F_CLOSE:
            self.resp_bytes += len(chunk)
            return chunk
        return b""


# A body under this many bytes goes out joined to its head (one write); a bigger one is written after it,
# uncopied: the transport keeps a reference until it is sent, so slow readers of one big body share it.
_JOIN_MAX = 65536
_NO_HEADERS: list[tuple[bytes, bytes]] = []  # never appended to: a placeholder, not a list per connection

# Request headers the HTTP layer itself looks at, by name as sent (a bounded cache: names are few).
_H_HOST, _H_CL, _H_EXPECT, _H_TE, _H_HOST_DUP, _H_CT, _H_BAD = 1, 2, 4, 8, 16, 32, 64
_HKIND: dict[bytes, int] = {}
_HKIND_BY_LOWER = {b"host": _H_HOST, b"content-length": _H_CL, b"expect": _H_EXPECT, b"transfer-encoding": _H_TE,
                   b"content-type": _H_CT, b"content_length": _H_BAD, b"transfer_encoding": _H_BAD}
# Host values seen valid (RFC 9110 7.2: uri-host [":" port], RFC 3986 host syntax); bounded like every cache.
_GOOD_HOSTS: dict[bytes, bool] = {}
_REG_NAME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%")
_IP_LITERAL = frozenset(b"0123456789abcdefABCDEF:.vV-_~!$&'()*+,;=")


def _check_host(host: bytes) -> None:
    """Accept `uri-host [":" port]` (a reg-name or IPv4, or an [IP-literal]); anything else is a 400: no
    userinfo (`user@host`), no path (`host/x`), no second host (`a, b`), not empty. Values once found
    valid are remembered (bounded)."""
    if host in _GOOD_HOSTS:
        return
    name, port = host, b""
    if host[:1] == b"[":
        end = host.find(b"]")
        if end < 2 or not set(host[1:end]) <= _IP_LITERAL:
            raise _Reject(400, "invalid Host header")
        rest = host[end + 1:]
        if rest and (rest[:1] != b":" or not rest[1:].isdigit()):
            raise _Reject(400, "invalid Host header")
    else:
        name, _, port = host.partition(b":")
        if not name or not set(name) <= _REG_NAME or (port and not port.isdigit()) or (b":" in port):
            raise _Reject(400, "invalid Host header")
        if host.endswith(b":"):
            raise _Reject(400, "invalid Host header")
    if len(_GOOD_HOSTS) < _CACHE_MAX:
        _GOOD_HOSTS[host] = True


def _header_kind(name: bytes) -> int:
    kind = _HKIND_BY_LOWER.get(name.lower(), 0)
    if len(_HKIND) < 4096:
        _HKIND[name] = kind
    return kind


def _head_size(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(n) + len(v) + 4 for n, v in headers)


# ---------------------------------------------------------------------------------------------------------
# WSGI adapter
# ---------------------------------------------------------------------------------------------------------

class FileWrapper:
    """`wsgi.file_wrapper`: recognised by the server and sent with os.sendfile when it wraps a real file."""

    def __init__(self, filelike: Any, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


class _EmptyInput:
    """`wsgi.input` of every request without a body: one shared, stateless object instead of a BytesIO each."""

    __slots__ = ()

    def read(self, size: int | None = -1) -> bytes:
        return b""

    def readline(self, size: int | None = -1) -> bytes:
        return b""

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return []

    def __iter__(self) -> _EmptyInput:
        return self

    def __next__(self) -> bytes:
        raise StopIteration

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


_EMPTY_INPUT = _EmptyInput()
_CACHE_MAX = 4096  # bound on every name/target cache: a client sending endless new names gets no memory
# Request header name as sent -> environ key; "" for names dropped.
_ENV_KEYS: dict[bytes, str] = {}
_METHODS: dict[bytes, str] = {}
# Request target -> (PATH_INFO, QUERY_STRING, RAW_URI): most traffic hits few URLs.
_TARGETS: dict[bytes, tuple[str, str, str]] = {}
_NO_BODY_CODES = frozenset((204, 304))
# Hop-by-hop or framing headers an app must not set (PEP 3333); we frame responses ourselves.
_HEAD_KIND: dict[str, int] = {}
_K_PLAIN, _K_CL, _K_CONN, _K_DROP, _K_DATE = 0, 1, 2, 3, 4
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_PERCENT, _HASH, _UNDERSCORE = 0x25, 0x23, 0x5F  # `int in bytes`: `b"%" in x` costs a TypeError in CPython 3.11

# Framing of a response body.
_F_NONE, _F_LENGTH, _F_CHUNKED, _F_CLOSE = 0, 1, 2, 3


def _env_key(name: bytes) -> str:
    low = name.lower()
    if low == b"content-type":
        key = "CONTENT_TYPE"
    elif low == b"content-length":
        key = "CONTENT_LENGTH"
    elif _UNDERSCORE in name:  # X_Forwarded_For must not alias X-Forwarded-For (header spoofing)
        key = ""
    else:
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    if len(_ENV_KEYS) < _CACHE_MAX:
        _ENV_KEYS[name] = key
    return key


def _method(method: bytes) -> str:
    m = method.decode("ascii")
    if len(_METHODS) < 64:
        _METHODS[method] = m
    return m


def _target(target: bytes) -> tuple[str, str, str]:
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
    if len(_TARGETS) >= _CACHE_MAX:
        _TARGETS.clear()
    _TARGETS[target] = t
    return t


def _head_kind(name: str) -> int:
    kind = _HEAD_KIND.get(name)
    if kind is None:
        if not name or any(c not in _TOKEN for c in name.encode("latin-1", "replace")):
            raise ValueError(f"invalid response header name {name!r}")
        low = name.lower()
        kind = {"content-length": _K_CL, "connection": _K_CONN, "transfer-encoding": _K_DROP,
                "keep-alive": _K_DROP, "date": _K_DATE}.get(low, _K_PLAIN)
        if len(_HEAD_KIND) < _CACHE_MAX:
            _HEAD_KIND[name] = kind
    return kind


class _Head:
    """A validated response head for one (status, headers), compiled once and reused by both adapters.

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
        self.plain = code >= 200 and code not in _NO_BODY_CODES and not app_close and not has_date
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


def _wsgi_head(status: str, headers: list[tuple[str, str]]) -> _Head:
    """Validate and compile a WSGI status and header list (PEP 3333: native strings)."""
    if type(status) is not str or len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
        raise ValueError(f"invalid WSGI status {status!r}")
    if "\n" in status or "\r" in status:
        raise ValueError("status contains a line break")
    out = ["HTTP/1.1 ", status, "\r\n"]
    app_cl: int | None = None
    app_close = has_date = False
    for name, value in headers:
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"response header {name!r}: {value!r} must be str")
        kind = _head_kind(name)
        if "\n" in value or "\r" in value or "\x00" in value:
            raise ValueError(f"response header {name!r} contains a line break")
        if kind == _K_CL:
            app_cl = int(value)
        elif kind == _K_CONN:
            app_close = "close" in value.lower()
            continue
        elif kind == _K_DROP:
            continue
        elif kind == _K_DATE:
            has_date = True
        out += (name, ": ", value, "\r\n")
    return _Head(int(status[:3]), "".join(out).encode("latin-1"), app_cl, app_close, has_date, list(headers))


def _closed(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the connection is closed")


class WsgiProtocol(HttpProtocol):
    """PEP 3333 on top of HttpProtocol. One response at a time per connection, in request order."""

    __slots__ = ("app", "base_env", "code", "cur_req", "framing", "head_sent", "is_head", "keep", "remaining", "req_line",
                 "resp_bytes", "resp_headers", "resp_iter", "resp_result", "rversion", "sf", "start_response",
                 "status", "t0", "threaded", "write_cb")

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self.app = server.app
        self.threaded = server.executor is not None
        # Bound once, not per request; they refer back to us, so on_lost() lets go of them (see there).
        self.start_response = self._start_response
        self.write_cb = self._write_legacy
        self.base_env: dict[str, Any] = {}
        self.status: str | None = None
        self.resp_headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.framing = _F_NONE
        self.remaining = -1
        self.resp_bytes = 0
        self.resp_iter: Any = None
        self.resp_result: Any = None
        self.cur_req: Request | None = None  # the request of a response in _respond/_pump (the monitor names it)
        self.keep = True
        self.is_head = False
        self.t0 = 0.0
        self.req_line = ""
        self.rversion = "1.1"  # the version of the request being answered (self.version: being parsed)
        self.code = 0
        self.sf: tuple[int, int, int, int] = (0, 0, 0, 0)

    def setup(self, transport: Any) -> None:
        sockname = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        bases = self.server.env_bases
        base = bases.get(sockname)
        if base is None:  # once per local address: a copy of it is cheaper than a 16-key dict per connection
            base = self._env_base(sockname)
            if len(bases) < 64:
                bases[sockname] = base
        self.base_env = env = base.copy()
        if isinstance(peer, tuple):
            env["REMOTE_ADDR"] = str(peer[0])
            env["REMOTE_PORT"] = str(peer[1])
        if self.threaded:
            self.writable = threading.Event()
            if not self.write_paused:
                self.writable.set()

    def saved_view(self) -> Any:
        return self.base_env

    def use_view(self, view: Any, client: str | None, scheme: str | None) -> None:
        """This request's client and scheme as a trusted proxy tells them (proxy.py); else the connection's."""
        if client is None and scheme is None:
            self.base_env = view
            return
        env = view.copy()
        if client is not None:
            env["REMOTE_ADDR"] = client
            env["REMOTE_PORT"] = ""
        if scheme is not None:
            env["wsgi.url_scheme"] = scheme
        self.base_env = env

    def _env_base(self, sockname: Any) -> dict[str, Any]:
        """The environ keys that are the same for every connection to one local address."""
        if isinstance(sockname, tuple):
            server_name, server_port = str(sockname[0]), str(sockname[1])
        else:
            server_name, server_port = "localhost", "0"
        return {
            "SERVER_NAME": server_name, "SERVER_PORT": server_port, "REMOTE_ADDR": "", "REMOTE_PORT": "",
            "SCRIPT_NAME": "", "SERVER_SOFTWARE": "clusterctl", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": self.threaded, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True,
        }

    # -- environ ----------------------------------------------------------------------------------------
    def build_environ(self, req: Request) -> dict[str, Any]:
        method, target, headers, body, _keep, version, cl_given = req
        env = self.base_env.copy()
        env["REQUEST_METHOD"] = _METHODS.get(method) or _method(method)
        if version != "1.1":
            env["SERVER_PROTOCOL"] = "HTTP/1.0"
        t = _TARGETS.get(target) or _target(target)
        env["PATH_INFO"] = t[0]
        env["QUERY_STRING"] = t[1]
        env["RAW_URI"] = t[2]
        keys = _ENV_KEYS
        setdefault = env.setdefault
        for name, value in headers:
            key = keys.get(name)
            if not key:
                if key is None:
                    key = _env_key(name)
                if not key:
                    continue
            v = value.decode("latin-1")
            old = setdefault(key, v)
            if old is not v:  # repeated header: merge per RFC 9110 (cookies with "; ")
                env[key] = old + ("; " if key == "HTTP_COOKIE" else ",") + v
        if body or cl_given:
            env["CONTENT_LENGTH"] = str(len(body))
            env["wsgi.input"] = io.BytesIO(body)
        else:
            env["wsgi.input"] = _EMPTY_INPUT
        return env

    # -- request handling ---------------------------------------------------------------------------------
    def handle(self, req: Request, keep_alive: bool) -> None:
        server = self.server
        if server.app_owner is not None:  # a streamed response holds the app slot: wait for it (run_waiting)
            server.app_waiting.append((self, req, keep_alive))
            return
        server.app_req = req  # the monitor thread (watchdog.py) names a request that outlives --timeout
        try:
            try:
                env = self.build_environ(req)
            except Exception:
                log.exception("cannot build environ")
                server.errors += 1
                self.send(_canned(400))
                self.finish(False)
                return
            self.status = None
            self.head_sent = False
            self.resp_bytes = 0
            self.keep = keep_alive
            self.rversion = version = req[5]
            self.is_head = is_head = req[0] == b"HEAD"
            if server.access_log is not None:
                self.t0 = time.perf_counter()
                self.req_line = f"{env['REQUEST_METHOD']} {env['RAW_URI']} {env['SERVER_PROTOCOL']}"
            if self.threaded:
                server.executor.submit(self._run_threaded, env, req)  # type: ignore[union-attr]
                return
            try:
                result = self.app(env, self.start_response)
            except Exception:
                self._app_error(None)
                return
            # Fast path, the common shape: one bytes body, a plain head, HTTP/1.1, not HEAD.
            # One dict lookup for the head, one for the head+Date+Content-Length(+close) bytes, one write.
            if type(result) is list and len(result) == 1 and not is_head and version == "1.1":
                body = result[0]
                try:
                    h = server.heads.get(self.status)  # type: ignore[arg-type]
                    if h is None or h.headers != self.resp_headers:
                        h = self._lookup_head()
                except Exception:
                    self._app_error(result)
                    return
                if h.plain and type(body) is bytes and not self.head_sent:
                    n = len(body)
                    key = n if keep_alive else ~n
                    # The cached head under the current Date line, without a call; full_head() fills the cache.
                    full = h.full.get(key) if h.date is server.date_line else None
                    if full is None:
                        full = h.full_head(server.date_line, key)
                    if full is not None:
                        if not self.closed:
                            if n < _JOIN_MAX:
                                self.transport.write(full + body)
                            else:  # no copy of a big body: the transport keeps a reference until it is sent
                                self.transport.write(full)
                                self.transport.write(body)
                        self.code = h.code
                        self.resp_bytes = n
                        if server.access_log is not None:
                            server.access_log(self, h.code, n)
                        self.finish(keep_alive)
                        return
            self.cur_req = req
            self._respond(result)
        finally:
            server.app_req = None

    def _run_threaded(self, env: dict[str, Any], req: Request) -> None:
        running = self.server.running
        ident = threading.get_ident()
        running[ident] = (req, time.monotonic())  # the monitor thread bounds it by --timeout
        try:
            self._run(env)
        except BaseException:  # never let a worker thread die silently
            log.exception("request thread failed")
        finally:
            running.pop(ident, None)

    def _step(self) -> None:
        """The next chunk of a streamed response, on a loop turn of its own (see `_pump`)."""
        if self.resp_iter is None or self.resp_iter is _SENDFILE or self.closed or self.write_paused:
            return
        server = self.server
        server.app_req = self.cur_req
        server.app_steps += 1
        try:
            self._pump()
        finally:
            server.app_req = None

    def _release_app(self) -> None:
        """A streamed response ended: the requests that waited for the app slot go next (a later loop turn)."""
        server = self.server
        if server.app_owner is self:
            server.app_owner = None
            if server.app_waiting:
                self.loop.call_soon(server.run_waiting)

    def _start_response(self, status: str, headers: list[tuple[str, str]],
                        exc_info: Any = None) -> Callable[[bytes], None]:
        # Status and headers are validated when their head is compiled (once per distinct pair).
        if exc_info:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        self.status = status
        self.resp_headers = headers
        return self.write_cb

    def _run(self, env: dict[str, Any]) -> None:
        try:
            result = self.app(env, self.start_response)
        except Exception:
            self._app_error(None)
            return
        self._respond(result)

    def _respond(self, result: Any) -> None:
        """Every response shape other than the fast path's: streams, files, HEAD, errors, threads."""
        self.resp_result = result
        try:
            rtype = type(result)
            if (rtype is list or rtype is tuple) and not self.head_sent:
                # The whole body is known: frame it with Content-Length, write it in one go.
                if self.status is None:
                    raise RuntimeError("app returned without calling start_response()")
                body = result[0] if len(result) == 1 else b"".join(result)
                if type(body) is not bytes:
                    raise TypeError(f"response body must be bytes, not {type(body).__name__}")
                head = self._head(len(body))
                if self.framing == _F_NONE:
                    self.send(head)
                elif len(body) < _JOIN_MAX:
                    self.send(head + self._frame(body))
                else:  # no copy of a big body
                    self.send(head)
                    self.send(self._frame(body))
                self._done()
                return
            if rtype is FileWrapper and not self.threaded and self._try_sendfile(result):
                return
            self.resp_iter = iter(result)
        except Exception:
            self._app_error(result)
            return
        self._pump()

    def _pump(self) -> None:
        """Send body chunks until the iterable ends or the client stops reading (then resume later).

        The head waits for the first non-empty chunk (PEP 3333) and is then sent at once, chunked when
        the length is unknown: peeking further would delay streamed responses. HEAD iterates the body
        (discarding it) so it can report the same Content-Length a GET would get.

        Inline (no --threads), each chunk sent ends this call and the next one comes on a later loop turn
        (`_step`) unless the app's Content-Length is already complete: the loop flushes the chunk, sees a
        client that left (on_lost closes the iterable, so GeneratorExit reaches a generator within a chunk
        or two of the close) and runs its timers; the app slot stays held meanwhile.
        """
        it = self.resp_iter
        try:
            if self.is_head and not self.head_sent:
                total = 0
                for chunk in it:
                    if type(chunk) is not bytes:
                        raise TypeError(f"response chunks must be bytes, not {type(chunk).__name__}")
                    total += len(chunk)
                    if self.head_sent:
                        break
                if not self.head_sent:
                    if self.status is None:
                        raise RuntimeError("app returned without calling start_response()")
                    self.send(self._head(total))
            for chunk in it:
                if self.closed:
                    break
                if not chunk:
                    if type(chunk) is not bytes:
                        raise TypeError(f"response chunks must be bytes, not {type(chunk).__name__}")
                    continue
                if not self.head_sent:
                    if self.status is None:
                        raise RuntimeError("app yielded a body before calling start_response()")
                    self.send(self._head(None))
                if type(chunk) is not bytes:
                    raise TypeError(f"response chunks must be bytes, not {type(chunk).__name__}")
                if self.framing != _F_NONE:
                    self.send(self._frame(chunk))
                    if not self.threaded and (self.framing != _F_LENGTH or self.remaining > 0):
                        self.server.app_owner = self
                        if not self.write_paused:  # else resume_writing -> on_writable -> _step
                            self.loop.call_soon(self._step)
                        return
                if self.write_paused and not self.threaded:
                    return  # resume_writing -> on_writable -> _step
        except Exception:
            self._app_error(self.resp_result)
            return
        self.resp_iter = None
        try:
            if not self.head_sent and not self.closed:
                if self.status is None:
                    raise RuntimeError("app returned without calling start_response()")
                self.send(self._head(0))
            elif self.framing == _F_CHUNKED and not self.closed:
                self.send(b"0\r\n\r\n")
        except Exception:
            self._app_error(self.resp_result)
            return
        self._done()

    def on_writable(self) -> None:
        if self.threaded:
            if not self.busy:
                self.run_queue()
        elif self.resp_iter is _SENDFILE and self.busy:
            self._sendfile_step()
        elif self.resp_iter is not None and self.busy:
            self._step()
        elif not self.busy:
            self.run_queue()

    def on_lost(self) -> None:
        if self.busy and not self.threaded and self.resp_iter is not None:
            # The client left mid-response: close the app's iterable now (PEP 3333), the loop hidden as for
            # any app code, and free the app slot for the requests waiting on it.
            self.resp_iter = None
            self._close_result(self.resp_result)
            self.resp_result = None
            self.busy = False
            self.server.in_flight -= 1
            self._release_app()
        if not self.busy:
            # Break the self -> bound method -> self cycles so that a closed connection is freed by reference
            # counting (with the parser, -44% instructions per Connection: close request). An app that kept
            # these callables still holds them; only a request not yet started (a busy thread) reads the slots.
            self.start_response = self.write_cb = _closed

    # -- response framing -------------------------------------------------------------------------------
    def _lookup_head(self) -> _Head:
        status = self.status
        if status is None:
            raise RuntimeError("app returned without calling start_response()")
        headers = self.resp_headers
        server = self.server
        key = (status, tuple(headers))
        cache = server.head_cache
        h = cache.get(key)
        if h is None:
            h = _wsgi_head(status, headers)
            if len(cache) > 512:
                cache.clear()
                server.heads.clear()
            cache[key] = h
        server.heads[status] = h  # the last head per status: found again without hashing the headers
        return h

    def _head(self, body_len: int | None) -> bytes:
        """Response head bytes; decides framing. `body_len` is the whole body's size when known."""
        h = self.server.heads.get(self.status)  # type: ignore[arg-type]
        if h is None or h.headers != self.resp_headers:
            h = self._lookup_head()
        code = h.code
        keep = self.keep and not h.app_close and not (self.server.draining and not self.queue)
        return self._framed_head(h.prefix, h.has_date, code, h.app_cl, body_len, keep)

    def _write_legacy(self, data: bytes) -> None:
        """The write() callable returned by start_response (PEP 3333's imperative API)."""
        if type(data) is not bytes:
            raise TypeError("write() takes bytes")
        if not self.head_sent:
            self.send(self._head(None))
        if data and self.framing != _F_NONE:
            self.send(self._frame(data))

    # -- sending ------------------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not self.threaded or threading.get_ident() == self.server.loop_thread:
            if not self.closed:
                self.transport.write(data)
            return
        self.writable.wait(self.limits.body_timeout)  # type: ignore[union-attr]  # made in setup() when threaded
        if not self.closed:
            self.loop.call_soon_threadsafe(self._write_now, data)

    def _write_now(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def _try_sendfile(self, wrapper: FileWrapper) -> bool:
        """Send a real file with os.sendfile (zero copy); False if it is not a plain file."""
        f = wrapper.filelike
        try:
            fd = f.fileno()
            st = os.fstat(fd)
            offset = f.tell()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        size = max(0, st.st_size - offset)
        if self.status is None:
            raise RuntimeError("app returned without calling start_response()")
        head = self._head(size)
        count = min(size, self.remaining) if self.framing == _F_LENGTH else 0
        if self.framing == _F_LENGTH and count < self.remaining:
            self.keep = False  # file shorter than the app's Content-Length: the client must see EOF
        self.send(head)
        self.resp_bytes += count
        if self.framing == _F_LENGTH:
            self.remaining -= count
        self.sf = (sock.fileno(), fd, offset, offset + count)
        self.resp_iter = None
        self._sendfile_step()
        return True

    def _sendfile_step(self) -> None:
        sock_fd, fd, pos, end = self.sf
        while pos < end and not self.closed:
            # Earlier bytes still queued in the transport: keep order by going through it.
            sent = -1 if self.transport.get_write_buffer_size() else None
            if sent is None:
                try:
                    sent = os.sendfile(sock_fd, fd, pos, end - pos)
                except BlockingIOError:
                    sent = -1  # socket full: one buffered block makes the transport tell us when it drains
                except OSError:
                    self.abort()
                    break
                if sent == 0:
                    break
            if sent >= 0:
                pos += sent
                continue
            chunk = os.pread(fd, min(end - pos, 262144), pos)
            if not chunk:
                break
            pos += len(chunk)
            self.transport.write(chunk)
            if self.write_paused:
                self.sf = (sock_fd, fd, pos, end)
                self.resp_iter = _SENDFILE
                return
        self.resp_iter = None
        self._done()

    # -- completion ---------------------------------------------------------------------------------------
    def _close_result(self, result: Any) -> None:
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("error closing the app's response iterable")

    def _done(self) -> None:
        result = self.resp_result
        self.resp_result = None
        if result is not None and type(result) is not list and type(result) is not tuple:
            self._close_result(result)
        if self.server.app_owner is self:
            self._release_app()
        keep = self.keep
        if self.framing == _F_LENGTH and self.remaining > 0:
            keep = False  # app sent less than its Content-Length: only closing keeps the framing honest
        if self.server.access_log is not None:
            self.server.access_log(self, self.code, self.resp_bytes)
        if self.threaded and threading.get_ident() != self.server.loop_thread:
            self.loop.call_soon_threadsafe(self.finish, keep)
        else:
            self.finish(keep)

    def _app_error(self, result: Any) -> None:
        log.exception("error in WSGI app handling %s", getattr(self, "req_line", "") or "a request")
        self.server.errors += 1
        self.resp_iter = None
        if result is not None:
            self._close_result(result)
        self.resp_result = None
        if self.server.app_owner is self:
            self._release_app()
        self.code = 500
        self.resp_bytes = 0
        if not self.head_sent:
            self.send(_canned(500, close=not self.keep))
            keep = self.keep
        else:
            keep = False  # half a response is on the wire: only closing tells the client
        if self.server.access_log is not None:
            self.server.access_log(self, 500, 0)
        if self.threaded and threading.get_ident() != self.server.loop_thread:
            self.loop.call_soon_threadsafe(self.finish, keep)
        else:
            self.finish(keep)


_SENDFILE = object()


Server.protocol_class = WsgiProtocol

