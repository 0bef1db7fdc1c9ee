"""The HTTP/1.1 wire: httptools (llhttp, Node's parser) on an asyncio/uvloop protocol.

`HttpProtocol` owns everything on the wire and nothing about apps: parser callbacks, limits (414/431/413),
timeouts (idle keep-alive, slow headers, slow body, stalled writes), smuggling shapes (llhttp rejects CL+TE,
duplicate CL, obs-fold, bare LF, bad chunk sizes; we add Host, version and target-form checks), trailers
(bounded, then dropped), pipelining in order, keep-alive, flow control in both directions and the
connection limit. A parse error answers 400 after the requests already read and closes: nothing after it
on that connection is ever processed.

Each complete message becomes a `request.Request` that goes to `handle()`, which an adapter implements
(wsgi.py, asgi.py, on response.py's `ResponseWriter`); the adapter calls `finish()` when its response is
done and the next queued request goes. The hooks adapters may override are marked "Hook".

Hot path notes (measured in instructions per request, bench/bench_engine_cpu.py and bench/RESULTS.md):
protocols use __slots__; header names stay as sent and go through bounded caches; no clock reads or timers
per request (one periodic sweep in server.py handles timeouts and the Date line); `int in bytes`, never
`b"x" in bytes` (CPython 3.11 raises and clears a TypeError inside the latter).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools

from clusterctl.http.request import (
    GOOD_HOSTS,
    H_CL,
    H_CT,
    H_EXPECT,
    H_HOST,
    H_HOST_DUP,
    H_TE,
    HKIND,
    Reject,
    Request,
    check_host,
    head_size,
    header_kind,
)

log = logging.getLogger("clusterctl.engine")

# The hot path calls methods through module-level names bound here: CPython 3.11 compiles `name.method()` to a
# generic, unspecializable attribute lookup when `name` was imported, and to LOAD_METHOD (or one global) when not.
_hkind = HKIND.get

@dataclass(slots=True)
class Limits:
    """Per-request limits and per-connection timeouts (seconds). Defaults follow nginx/gunicorn; the
    worker's options (`--keepalive-timeout` ...) take theirs from here."""

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

REASONS = {s.value: s.phrase for s in HTTPStatus}
_NO_HEADERS: list[tuple[bytes, bytes]] = []  # never appended to: a placeholder, not a list per connection


def error_response(code: int, close: bool = True, extra: str = "") -> bytes:
    """A complete plain-text response for `code`: the HTTP layer's own answers (4xx, 503) and an app's 500."""
    reason = REASONS.get(code, "Error")
    body = f"{code} {reason}\n".encode()
    head = (f"HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\n{extra}" + ("connection: close\r\n" if close else "") + "\r\n")
    return head.encode("latin-1") + body


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 wire protocol; subclasses implement `handle(request)` and call `finish()` when done."""

    # Slots: with more than 30 attributes CPython 3.11 stops sharing instance-dict keys and every
    # self.x becomes a dict lookup; slot access is a fixed offset.
    __slots__ = ("big_read", "body", "body_held", "body_len", "busy", "closed", "continue_pending", "error", "expect",
                 "good_host", "got_bytes", "head_carry", "head_limit", "headers", "hflags", "in_head", "limits",
                 "lingering", "loop",
                 "max_field", "max_header_size", "max_headers", "max_request_line", "measure", "parser", "phase",
                 "queue", "read_big", "read_paused", "req_headers", "running_queue", "server", "since", "spare", "stop_parsing",
                 "streaming", "trailing", "transport", "url", "version", "write_paused")

    # True: a request with a body that arrives while the connection is idle is handed to the adapter at the
    # end of its head, and the body follows as it is read (ASGI's http.request with more_body). False: the
    # body is read whole first, bounded by --max-body-size (WSGI apps read wsgi.input synchronously).
    stream_bodies = False

    def __init__(self, server: Any) -> None:  # a server.Server (which imports this module)
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.spare: Request | None = None  # an answered request's object, reused by the next
        self.busy = False
        self.closed = False
        self.stop_parsing = False     # after an error/upgrade/close: never look at further bytes
        self.error: Reject | None = None
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
        self.hflags = 0               # request.H_* bits seen in this head
        self.good_host = b"\x00"      # the last Host value this connection sent that was valid
        # A chunked request's trailer section: its fields go to a list of their own (self.headers, swapped in
        # on_headers_complete) that is bounded like a head and then dropped, never merged into the request.
        self.trailing = False
        self.req_headers: list[tuple[bytes, bytes]] = _NO_HEADERS  # read only while trailing
        self.expect = b""             # valid only while hflags & H_EXPECT
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
            transport.write(error_response(503, extra="retry-after: 1\r\n"))
            self.close()
            return
        self.setup(transport)

    def setup(self, transport: Any) -> None:
        """Hook for adapters: per-connection state derived from the socket."""

    def saved_view(self) -> Any:
        """Hook for adapters: the connection's own view of its client and scheme, as `setup` made it (what
        proxy.py restores for a request without trusted forwarded headers)."""
        return None

    def use_view(self, view: Any, client: str | None, scheme: str | None) -> None:
        """Hook for adapters: serve the next request as from `client` over `scheme` (None: the view's own)."""

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
        self.on_lost()

    def on_lost(self) -> None:
        """Hook for adapters: the client went away (possibly mid-response)."""

    def pause_writing(self) -> None:
        self.write_paused = True
        self.since = self.server.clock

    def resume_writing(self) -> None:
        self.write_paused = False
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
            self.fail(ctx if isinstance(ctx, Reject) else Reject(400, str(ctx or e)))
            return
        except (httptools.HttpParserError, httptools.HttpParserInvalidMethodError,
                httptools.HttpParserInvalidURLError) as e:
            self.fail(Reject(400, str(e)))
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
            self.queue[-1].keep_alive = False

    def _head_over(self) -> bool:
        """Bound an unfinished head or trailer section (llhttp buffers a partial header line without calling us)."""
        headers = self.headers
        if (self.head_carry > self.head_limit or len(headers) > self.max_headers
                or (self.measure and head_size(headers) > self.max_header_size)):
            self.headers = []
            self.fail(Reject(431, "request trailers too large" if self.trailing else "request head too large"))
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
            raise Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Names stay as sent (no .lower() per header); the few that matter here are found by a cache.
        self.headers.append((name, value))
        kind = _hkind(name)
        if kind is None:
            kind = header_kind(name)
        if kind:
            if kind == H_HOST and not self.hflags & H_HOST:  # the one every request has, without a call
                self.hflags |= H_HOST
                if value != self.good_host:  # checked once per connection while it sends the same one
                    self._host_seen(value)
            else:
                self._special_header(kind, value, name)

    def _special_header(self, kind: int, value: bytes, name: bytes = b"") -> None:
        if kind == H_HOST:
            self.hflags |= H_HOST_DUP if self.hflags & H_HOST else H_HOST
        elif kind == H_CL:
            self.hflags |= H_CL
            if not value.isdigit():
                raise Reject(400, "invalid Content-Length")
            if int(value) > self.limits.max_body_size:
                raise Reject(413, "body larger than --max-body-size")
        elif kind == H_EXPECT:
            self.hflags |= H_EXPECT
            self.expect = value.lower()
        elif kind == H_TE:
            self.hflags |= H_TE
        elif kind == H_CT:
            if self.hflags & H_CT:
                raise Reject(400, "more than one Content-Type header")
            self.hflags |= H_CT
        else:  # Transfer_Encoding, Content_Length: a framing header in disguise (an environ key would alias it)
            raise Reject(400, f"invalid header name {name!r}")

    def on_headers_complete(self) -> None:
        headers = self.headers
        if len(headers) > self.max_headers:
            raise Reject(431, "too many request headers")
        if self.measure:
            if head_size(headers) > self.max_header_size:
                raise Reject(431, "request headers too large")
            limit = self.max_field
            for name, value in headers:
                if len(name) + len(value) > limit:
                    raise Reject(431, "a request header field is too large")
        self.in_head = False
        self.phase = BODY
        self.version = version = self.parser.get_http_version()
        hf = self.hflags
        if version == "1.1":
            if hf & (H_HOST | H_HOST_DUP) != H_HOST:
                raise Reject(400, "HTTP/1.1 request needs exactly one Host header")
        elif version == "1.0":
            if hf & H_TE:
                raise Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            if hf & H_HOST_DUP:
                raise Reject(400, "more than one Host header")
        else:
            raise Reject(505 if version[:1] > "1" else 400, f"HTTP/{version} not supported")
        if self.url[0] != 47:  # not origin-form ("/..."): asterisk, absolute or authority form
            self._other_target_form(headers)
        if hf & H_TE:  # chunked: trailers go to a list of their own, bounded, then dropped
            self.req_headers = headers
            self.headers = []
            self.trailing = True
            self.head_carry = 0
            self.measure = False
        if hf & (H_CL | H_TE):
            self.since = self.server.clock  # a body follows: the body timeout starts now
            expects = False
            if hf & H_EXPECT:
                if self.expect != b"100-continue":
                    raise Reject(417, "unsupported Expect")
                expects = version == "1.1"
            if self.stream_bodies and not (self.busy or self.queue):
                self.continue_pending = expects  # the adapter sends 100 Continue when the app first reads
                self._dispatch_streamed()
            elif expects:
                if self.busy or self.queue:
                    self.continue_pending = True
                else:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif hf & H_EXPECT and self.expect != b"100-continue":
            raise Reject(417, "unsupported Expect")

    def _host_seen(self, host: bytes) -> None:
        """Check a Host value that is not the connection's last valid one (RFC 9110 7.2), else 400."""
        if host not in GOOD_HOSTS:  # check_host looks too; here it saves a call per connection (close mode)
            check_host(host)
        self.good_host = host

    def _other_target_form(self, headers: list[tuple[bytes, bytes]]) -> None:
        """`*` (OPTIONS only), absolute-form (its authority replaces Host, RFC 9112 3.2.2) or CONNECT."""
        url = self.url
        method = self.parser.get_method()
        if method == b"CONNECT":
            raise Reject(501, "CONNECT is not served")
        if url == b"*":
            if method != b"OPTIONS":
                raise Reject(400, "the asterisk target is for OPTIONS only")
            return
        scheme, sep, rest = url.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise Reject(400, "invalid request target")
        authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
        check_host(authority)
        for i, (name, _) in enumerate(headers):
            if _hkind(name) == H_HOST:
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
        self.handle(Request.make(parser.get_method(), self.url, headers, None, keep, self.version,
                                 self.hflags & H_CL != 0), keep and not server.draining)

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)  # reset per message in on_url
        self.head_carry = 0  # body bytes, not trailers (counted in data_received only while trailing)
        if self.streaming:
            if self.body_len > self.limits.max_body_size:
                raise Reject(413, "body larger than --max-body-size")
            self.stream_chunk(body)
            return
        if self.body is None:
            self.body = [body]
        else:
            self.body.append(body)
        server = self.server
        server.buffered += len(body)  # body_len of them is counted back by on_message_complete or _unbuffer
        if self.body_len > self.limits.max_body_size:
            raise Reject(413, "body larger than --max-body-size")
        if server.buffered > self.limits.max_buffered:
            raise Reject(503, "the worker's buffered request bodies are over --max-buffered")

    def on_message_complete(self) -> None:
        # No clock update here: a queued request is never timed out, and finish() restarts the idle clock.
        headers = self.headers
        if self.trailing:  # the trailer fields are bounded like a head (431) and dropped (README: HTTP limits)
            self.trailing = False
            if len(headers) > self.max_headers or head_size(headers) > self.max_header_size:
                raise Reject(431, "request trailers too large")
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
        req = self.spare
        if req is None:
            req = Request()  # slot stores below, no __init__ frame (request.py)
        else:
            self.spare = None
        req.method = parser.get_method()
        req.target = self.url
        req.headers = headers
        req.body = b"" if body is None else body[0] if len(body) == 1 else b"".join(body)
        req.keep_alive = parser.should_keep_alive()
        req.version = self.version
        req.cl_given = self.hflags & H_CL != 0
        self.queue.append(req)
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
                self.handle(req, req.keep_alive and not (server.draining and not queue))
                if not self.busy:
                    # Answered already (the common case): nothing holds it, so it carries the next request (an
                    # allocation and a deallocation less per keep-alive request).
                    self.spare = req
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
        """Hook for adapters: answer `req` (keep the connection after it if `keep_alive`), then `finish()`."""
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
    def fail(self, err: Reject) -> None:
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
        self.transport.write(error_response(err.status))
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
            self.fail(Reject(408, "request body not received in time"))
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
                    self.fail(Reject(408, "request head not received in time"))
                else:
                    self.close()
        elif now - self.since > lim.body_timeout + self.body_len / lim.min_body_rate:
            self.fail(Reject(408, "request body not received in time"))

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
