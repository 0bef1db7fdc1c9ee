"""ASGI 3 as a thin adapter over the same HTTP layer as WSGI: `AsgiProtocol(ResponseWriter)`, lifespan,
interface detection.

Everything on the wire (parsing, limits, 400/413/414/431, timeouts, smuggling checks, pipelining,
Expect: 100-continue, read backpressure) is `protocol.HttpProtocol`'s and the framing is
`response.ResponseWriter`'s, unchanged: this module only turns one parsed request into a `scope` +
`receive`/`send` pair and hands what the app sends to the writer. One response at a
time per connection, in request order (the HTTP layer starts the next request on `finish()`).

Bodies are streamed (`stream_bodies`): a request whose body starts on an idle connection reaches the app
at the end of its head, and `http.request` messages carry the body as it is read, `more_body` until the
last. Flow control: past `BODY_HIGH_WATER` bytes read and not yet received by the app, the HTTP layer
stops reading the socket, so a slow app never holds more than that (plus one read) of a 100 MB upload.
A request pipelined behind another one is read whole first, like WSGI's, bounded by --max-body-size.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from clusterctl.errors import ClusterctlError
from clusterctl.http.loop import settle
from clusterctl.http.request import CACHE_MAX, METHODS, TARGETS, Request, method_name, split_target
from clusterctl.http.response import F_CHUNKED, F_NONE, REASONS, Head, ResponseWriter, compile_head
from clusterctl.http.server import Limits, Server

log = logging.getLogger("clusterctl.asgi")

# The hot path calls methods through module-level names bound here: CPython 3.11 compiles `name.method()` to a
# generic, unspecializable attribute lookup when `name` was imported, and to LOAD_METHOD (or one global) when not.
_methods = METHODS.get
_writer_init = ResponseWriter.__init__

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
INTERFACES = ("auto", "wsgi", "asgi")


# -- interface detection ------------------------------------------------------------------------------------

def _positional(obj: Any) -> int | None:
    """How many positional arguments `obj` takes (None: cannot tell, e.g. *args or no signature)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def _is_async(obj: Any) -> bool:
    if inspect.iscoroutinefunction(obj):
        return True
    if inspect.isclass(obj):
        return False
    # An app object (Starlette, FastAPI, Django's ASGIHandler) with an async __call__, found on its class.
    call = next((c.__dict__["__call__"] for c in type(obj).__mro__ if "__call__" in c.__dict__), None)
    return call is not None and inspect.iscoroutinefunction(call)


def detect(obj: Any, spec: str, interface: str = "auto") -> tuple[str, Any]:
    """("wsgi" | "asgi", callable): ASGI 3 as is, ASGI 2 (double-callable) adapted, WSGI as is.

    `auto` looks at the object itself, since `--app` names one object and the unit must not need a flag
    for the common cases: async callables are ASGI 3, a one-argument callable or class is ASGI 2, a
    two-argument one is WSGI. Anything else is refused with what was found."""
    if interface not in INTERFACES:
        raise ClusterctlError(f"unknown --interface {interface!r}", "use auto, wsgi or asgi")
    what = f"{type(obj).__name__}" + ("" if (n := _positional(obj)) is None else f" taking {n} argument(s)")
    if _is_async(obj):
        if interface == "wsgi":
            raise ClusterctlError(f"{spec} is an async callable (an ASGI app), not WSGI",
                                  "drop --interface wsgi (or use --interface asgi)")
        return "asgi", obj
    if n == 1 and interface != "wsgi":
        return "asgi", _asgi2(obj)
    if interface == "asgi":
        if n in (None, 3):
            return "asgi", obj  # a sync callable returning an awaitable: trust the flag
        raise ClusterctlError(f"{spec} is a {what}: not an ASGI app (scope, receive, send)",
                              "drop --interface asgi, or point --app at the ASGI application object")
    if n in (None, 2) or interface == "wsgi":
        return "wsgi", obj
    raise ClusterctlError(
        f"{spec} is a {what}: neither a WSGI app (environ, start_response) nor an ASGI app (scope, receive, send)",
        "point --app at the application object, e.g. myapp:app")


def _asgi2(factory: Callable[[Scope], Any]) -> ASGIApp:
    """ASGI 2 double-callable -> ASGI 3: `factory(scope)` gives the instance awaited with (receive, send)."""
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await factory(scope)(receive, send)
    return app


# -- server -------------------------------------------------------------------------------------------------

class AsgiServer(Server):
    """A `Server` whose connections speak ASGI; `state` is the lifespan state copied into each scope."""

    __slots__ = ("http_tick", "state", "tasks", "websockets", "ws_deflate", "ws_max_size", "ws_ping_interval",
                 "ws_ping_timeout")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.state: dict[str, Any] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.ws_max_size = WS_MAX_SIZE  # --ws-max-size: larger messages close with 1009
        self.ws_deflate = True        # offer permessage-deflate (--ws-per-message-deflate)
        self.websockets = 0           # open WebSockets (STATUS=)
        self.ws_ping_interval = 0.0   # keepalive pings, see ws_keepalive()
        self.ws_ping_timeout = 0.0
        self.http_tick = self.tick_interval  # the sweep interval the HTTP timeouts need
        self.ws_keepalive(WS_PING, WS_PING)

    def ws_keepalive(self, interval: float, timeout: float) -> None:
        """--ws-ping-interval/--ws-ping-timeout (0: no pings). The engine's sweep sends the pings and closes the
        WebSockets that stopped answering (no timer per connection), so it must run often enough for them."""
        self.ws_ping_interval, self.ws_ping_timeout = interval, timeout
        self.tick_interval = self.http_tick
        if interval > 0:
            self.tick_interval = max(0.02, min(self.http_tick, interval / 4, timeout / 4))


BODY_HIGH_WATER = 65536
WS_MAX_SIZE = 16 * 1024 * 1024  # --ws-max-size default, as uvicorn's
WS_PING = 20.0                  # --ws-ping-interval and --ws-ping-timeout defaults, as uvicorn's
_MORE, _COMPLETE, _GIVEN, _BROKEN = 0, 1, 2, 3  # _Body.state


class _Body:
    """The streamed body of the request being handled: what was read and not yet received by the app."""

    __slots__ = ("parts", "size", "state", "waiter")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.state = _MORE
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        fut, self.waiter = self.waiter, None
        settle(fut)


class _Exchange:
    """One request/response on a connection, shared by its receive() and send(): `ended` once the response
    is complete or the client left, when a receive() waiting for more hears http.disconnect.

    Lighter than an asyncio.Event per request: most requests never wait, so no future exists until one does."""

    __slots__ = ("ended", "task", "waiters")

    def __init__(self) -> None:
        self.ended = False
        self.task: asyncio.Task[None] | None = None
        self.waiters: list[asyncio.Future[None]] | None = None

    def end(self) -> None:
        self.ended = True
        waiters, self.waiters = self.waiters, None
        if waiters:
            for fut in waiters:
                settle(fut)

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.ended:
            fut = loop.create_future()  # one per waiter: a cancelled waiter must not cancel the others
            if self.waiters is None:
                self.waiters = [fut]
            else:
                self.waiters.append(fut)
            await fut


def _asgi_head(status: Any, headers: Any) -> Head:
    """Validate and compile an http.response.start's status and headers (byte pairs) into a reusable head."""
    if type(status) is not int or not 100 <= status <= 999:
        raise ValueError(f"invalid ASGI status {status!r}")
    kept = list(headers)  # a copy: an app may change its list after sending it
    fields = [(bytes(name), bytes(value)) for name, value in kept]
    return compile_head(status, b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "").encode()), fields,
                        kept if type(headers) is list else headers)


def _scope_target(target: bytes) -> tuple[str, bytes, bytes]:
    """(path, raw_path, query_string) of a request target, cached like the WSGI adapter's."""
    t = TARGETS.get(target) or split_target(target)
    st = (t[0].encode("latin-1").decode("utf-8", "replace"), target.partition(b"?")[0], t[1].encode("latin-1"))
    if len(_SCOPE_TARGETS) >= CACHE_MAX:
        _SCOPE_TARGETS.clear()
    _SCOPE_TARGETS[target] = st
    return st


_SCOPE_TARGETS: dict[bytes, tuple[str, bytes, bytes]] = {}


class AsgiProtocol(ResponseWriter):
    """ASGI 3 HTTP on the HTTP layer: one app task per request, responses in request order."""

    __slots__ = ("app", "base_scope", "client", "drained", "ex", "inbox", "start", "ws")

    server: AsgiServer
    stream_bodies = True

    def __init__(self, server: AsgiServer) -> None:
        _writer_init(self, server)  # not super(): no super object per connection (close mode)
        self.app: ASGIApp = server.app
        self.base_scope: dict[str, Any] = {}
        self.client = ""                             # the client's address as this request sees it (access log)
        self.ex: _Exchange | None = None             # the request being answered
        self.drained: asyncio.Future[None] | None = None
        self.start: Message | None = None
        self.inbox: _Body | None = None              # the current request's streamed body, if it has one
        self.ws: Any = None  # websocket.WebSocket after an upgrade: every later byte is its

    def setup(self, transport: Any) -> None:
        sockname = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        server = (str(sockname[0]), int(sockname[1])) if isinstance(sockname, tuple) else (
            (sockname, None) if isinstance(sockname, str) and sockname else None)
        client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        self.base_scope = {"type": "http", "asgi": ASGI_VERSION, "scheme": "http", "root_path": "",
                           "server": server, "client": client}
        self.client = client[0] if client else ""

    def saved_view(self) -> Any:
        return self.base_scope, self.client

    def client_addr(self) -> str:
        return self.client

    def use_view(self, view: Any, client: str | None, scheme: str | None) -> None:
        """This request's client and scheme as a trusted proxy tells them (proxy.py); else the connection's."""
        scope, addr = view
        if client is None and scheme is None:
            self.base_scope, self.client = scope, addr
            return
        scope = scope.copy()
        if client is not None:
            scope["client"] = (client, 0)
            addr = client
        if scheme is not None:
            scope["scheme"] = scheme
        self.base_scope, self.client = scope, addr

    # -- websocket upgrade (clusterctl/websocket.py) ---------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.feed(data)
            return
        super().data_received(data)

    def on_upgrade(self, rest: bytes) -> None:
        from clusterctl.http.websocket import WebSocket, is_websocket  # here: wsproto is resident only once used

        if not (self.queue and is_websocket(self.queue[-1])):
            super().on_upgrade(rest)  # other upgrades (h2c ...): a plain HTTP answer
            return
        self.stop_parsing = True
        self.ws = WebSocket(self, self.queue[-1])
        self.ws.feed(rest)

    def check_timeout(self, now: float, lim: Limits) -> None:
        if self.ws is not None:
            self.ws.tick(now)  # keepalive pings: the sweep's hook for WebSockets
        super().check_timeout(now, lim)

    def drain(self) -> None:
        if self.ws is not None and self.ws.started:
            self.ws.going_away()
        else:
            super().drain()

    # -- request --------------------------------------------------------------------------------------------
    def handle(self, req: Request, keep_alive: bool) -> None:
        if self.ws is not None and req is self.ws.req:
            self.ws.start()
            return
        method = req.method
        target = req.target
        version = req.version
        body = req.body
        t = _SCOPE_TARGETS.get(target) or _scope_target(target)
        m = _methods(method) or method_name(method)  # the cache the WSGI adapter fills too
        scope = self.base_scope.copy()
        scope["http_version"] = version
        scope["method"] = m
        scope["path"], scope["raw_path"], scope["query_string"] = t
        scope["headers"] = [(n.lower(), v) for n, v in req.headers]
        scope["state"] = self.server.state.copy()
        self.start = None
        self.head_sent = False
        self.resp_bytes = 0
        self.code = 0
        self.keep = keep_alive
        self.rversion = version
        self.is_head = m == "HEAD"
        self.ex = ex = _Exchange()
        if self.closed:
            ex.ended = True
        if self.server.access_log is not None:
            self.t0 = time.perf_counter()
            self.req_line = f"{m} {target.decode('latin-1')} HTTP/{version}"
        if body is None:
            self.inbox = _Body()
            receive = self._streamed_receive(ex, self.inbox)
        else:
            self.inbox = None
            pending = [{"type": "http.request", "body": body, "more_body": False}]
            loop = self.loop

            async def receive() -> Message:
                if pending:
                    return pending.pop()
                await ex.wait(loop)
                return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if self.ex is not ex:
                if ex.ended and self.closed:
                    return  # the client left: sends are dropped, as receive() has said
                raise RuntimeError(f"ASGI message {message.get('type')!r} after the response completed")
            # The common shapes first (no coroutine for _send): the start, then the whole body in one
            # message on HTTP/1.1.
            start = self.start
            kind = message["type"]
            if start is None:
                if kind == "http.response.start":
                    self.start = message
                    return
            elif kind == "http.response.body" and not self.head_sent and not message.get("more_body", False):
                status = start["status"]
                hdrs = start.get("headers", ())
                server = self.server
                h = self._compiled_head(status, hdrs)
                body = message.get("body", b"")
                if h.plain and type(body) is bytes and not self.is_head and self.rversion == "1.1":
                    n = len(body)
                    keep = self.keep and not (server.draining and not self.queue)
                    full = h.full_head(server.date_line, n if keep else ~n)
                    if full is not None:
                        if not self.closed:
                            self.transport.write(full + body)
                        self.head_sent = True
                        self.code = h.code
                        self.resp_bytes = n
                        self._end(keep)
                        return
            await self._send(message)

        task = self.loop.create_task(self._run(scope, receive, send, ex))
        ex.task = task
        self.server.tasks.add(task)  # a strong reference while it runs

    def _streamed_receive(self, ex: _Exchange, inbox: _Body) -> Callable[[], Awaitable[Message]]:
        loop = self.loop

        async def receive() -> Message:
            while True:
                if inbox.parts:
                    parts = inbox.parts
                    chunk = parts[0] if len(parts) == 1 else b"".join(parts)
                    inbox.parts = []
                    inbox.size = 0
                    more = inbox.state == _MORE
                    if not more:
                        inbox.state = _GIVEN
                    if self.ex is ex:
                        self.release_body()
                    return {"type": "http.request", "body": chunk, "more_body": more}
                if inbox.state == _COMPLETE:
                    inbox.state = _GIVEN
                    return {"type": "http.request", "body": b"", "more_body": False}
                if self.ex is not ex or ex.ended or inbox.state == _BROKEN:
                    return {"type": "http.disconnect"}
                if inbox.state == _GIVEN:
                    await ex.wait(loop)
                    continue
                if self.continue_pending:  # the app wants the body: now the client may send it
                    self.continue_pending = False
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                inbox.waiter = loop.create_future()
                await inbox.waiter
        return receive

    def stream_chunk(self, chunk: bytes) -> None:
        inbox = self.inbox
        assert inbox is not None
        inbox.parts.append(chunk)
        inbox.size += len(chunk)
        if inbox.size > BODY_HIGH_WATER:
            self.hold_body()
        inbox.wake()

    def stream_end(self) -> None:
        inbox = self.inbox
        assert inbox is not None
        inbox.state = _COMPLETE
        inbox.wake()

    def stream_abort(self) -> None:
        inbox = self.inbox
        assert inbox is not None
        inbox.state = _BROKEN
        inbox.wake()
        self.release_body()
        err = self.error
        if self.ex is None:
            return
        if not self.head_sent and err is not None:
            self.code = err.status  # the HTTP layer sends the error response once the request has ended
            self._end(True)
        else:
            self.error = None
            self.server.errors += 1
            self._end(False)

    async def _run(self, scope: Scope, receive: Any, send: Any, ex: _Exchange) -> None:
        # `self.ex is ex` while this request's response is unfinished; after it ended, the app may
        # still run (background tasks) while the next pipelined request is served.
        try:
            await self.app(scope, receive, send)
        except Exception:
            if self.ex is ex:
                self._app_error()
            else:
                log.exception("error in ASGI app after its response to %s", self.req_line or "a request")
                self.server.errors += 1
            return
        finally:
            self.server.tasks.discard(ex.task)
        if self.ex is ex:
            if ex.ended:  # the client left (http.disconnect, _client_left): an app that stops then does right
                self._end(False)
                return
            if self.start is None:
                log.error("ASGI app returned without sending a response to %s", self.req_line or "a request")
            else:
                log.error("ASGI app returned before its response to %s was complete", self.req_line or "a request")
            self._app_error(logged=True)

    # -- response -------------------------------------------------------------------------------------------
    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.start is not None:
                raise RuntimeError("http.response.start sent twice")
            self.start = message
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r} for an HTTP request")
        if self.start is None:
            raise RuntimeError("http.response.body before http.response.start")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = []
        if not self.head_sent:
            out.append(self._head(len(body) if not more else None))
        if body and self.framing != F_NONE:
            out.append(self.frame(body))
        if not more and self.framing == F_CHUNKED:
            out.append(b"0\r\n\r\n")
        if out:
            self.send(b"".join(out))
        if not more:
            self._end(self.keep and self.complete())
            return
        if self.write_paused and not self.closed:
            self.drained = fut = self.loop.create_future()
            await fut

    def _compiled_head(self, status: Any, headers: Any) -> Head:
        """The last head compiled for this status when the app sent the same headers (mostly the same list:
        identity or a short compare), else the writer's cache (`lookup_head`)."""
        h = self.server.heads.get(status)
        if h is not None and type(status) is int and (h.headers is headers or h.headers == headers):
            return h
        return self.lookup_head(status, headers, _asgi_head)

    def _head(self, body_len: int | None) -> bytes:
        start = self.start
        assert start is not None
        return self.framed_head(self._compiled_head(start["status"], start.get("headers", ())), body_len)

    # -- completion -----------------------------------------------------------------------------------------
    def _end(self, keep: bool) -> None:
        ex = self.ex
        if ex is not None:
            ex.end()  # a receive() still waiting (e.g. a disconnect listener) returns http.disconnect
        self.ex = None
        if self.drained is not None:
            self._wake()
        if self.inbox is not None:
            self.inbox.wake()
            self.inbox = None
        if self.server.access_log is not None:
            self.server.access_log(self, self.code, self.resp_bytes)
        self.framing = F_NONE
        self.remaining = -1
        self.finish(keep)

    def _app_error(self, logged: bool = False) -> None:
        if not logged:
            log.exception("error in ASGI app handling %s", self.req_line or "a request")
        if self.ex is None:  # the response had already ended
            self.server.errors += 1
            return
        self._end(self.error_head())

    def _wake(self) -> None:
        fut, self.drained = self.drained, None
        settle(fut)

    def on_writable(self) -> None:
        if self.busy:
            self._wake()
        else:
            self.run_queue()

    def eof_received(self) -> bool | None:
        # The HTTP layer still answers what was read; the running app hears http.disconnect, as it would
        # under uvicorn, so a long poll or stream for a client that hung up stops.
        if self.ws is not None:
            return None  # a WebSocket client half-closing without a close frame: close (1006)
        keep_open = super().eof_received()
        self._client_left()
        return keep_open

    def on_lost(self) -> None:
        self._client_left()
        self._wake()

    def _client_left(self) -> None:
        if self.ex is not None:
            self.ex.end()
        if self.inbox is not None:
            self.inbox.wake()
        if self.ws is not None:
            self.ws.lost()


AsgiServer.protocol_class = AsgiProtocol


# -- lifespan -----------------------------------------------------------------------------------------------

class Lifespan:
    """The ASGI lifespan protocol for one worker: startup before READY=1, shutdown after the drain.

    An app that raises before it first calls receive() on the lifespan scope does not support lifespan
    (e.g. `assert scope["type"] == "http"`): that is logged and serving goes on. A failure after that is
    a failed startup: the worker exits non-zero so systemd's restart policy applies."""

    def __init__(self, app: ASGIApp, state: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.state = state
        self.loop = loop
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.received = False
        self.task: asyncio.Task[None] | None = None
        self.supported = True

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
        try:
            await self.app(scope, self._receive, self.outbox.put)
        except BaseException as e:
            if not self.received:
                log.info("the app does not support ASGI lifespan (%s: %s); serving without it", type(e).__name__, e)
                self.supported = False
            else:
                log.exception("ASGI lifespan failed")
            await self.outbox.put({"type": "_ended", "error": e})
            return
        await self.outbox.put({"type": "_ended", "error": None})

    async def _receive(self) -> Message:
        self.received = True
        return await self.inbox.get()

    async def _wait(self, phase: str) -> None:
        msg = await self.outbox.get()
        kind = msg["type"]
        if kind == f"lifespan.{phase}.complete":
            return
        if kind == f"lifespan.{phase}.failed":
            raise ClusterctlError(f"ASGI lifespan {phase} failed: {msg.get('message', '')}",
                                  "fix the app's lifespan handler (traceback above, if any)")
        if kind == "_ended":
            err = msg["error"]
            if not self.supported:
                return
            if err is None:
                if phase == "startup":
                    self.supported = False  # returned without answering: treat as no lifespan support
                    return
                raise ClusterctlError(f"ASGI lifespan {phase}: the app returned without answering",
                                      "send lifespan.shutdown.complete")
            raise ClusterctlError(f"ASGI lifespan {phase} failed: {type(err).__name__}: {err}",
                                  "fix the app's lifespan handler (traceback above)")
        raise ClusterctlError(f"ASGI lifespan {phase}: unexpected message {kind!r}", "see the ASGI lifespan spec")

    async def startup(self) -> None:
        self.task = self.loop.create_task(self._main())
        await self.inbox.put({"type": "lifespan.startup"})
        await self._wait("startup")

    async def shutdown(self, timeout: float) -> None:
        """Ask the app to shut down; raises ClusterctlError on failure, TimeoutError past `timeout`."""
        if not self.supported or self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self._wait("shutdown"), timeout)
