"""ASGI WebSockets (the `websocket` scope) on our HTTP layer; RFC 6455 itself is wsproto's, no framing here.

How a connection becomes a WebSocket: llhttp stops at a request with `Connection: upgrade` and the HTTP layer
calls `on_upgrade(rest)`; for `Upgrade: websocket` `AsgiProtocol` creates a `WebSocket` and routes every later
byte to it (`rest`, the bytes after the head, first) instead of the parser. When that request's turn comes
(`handle`), `start()` replays its head into wsproto's server handshake and runs the app. Around wsproto's
frames this module adds what a server needs:

* a message larger than `--ws-max-size` closes with 1009. With permessage-deflate the input goes to wsproto in
  small slices, so one read of compressed bytes cannot inflate far past that bound at once;
* backpressure both ways: reading pauses while the app has more than a few messages (or 1 MiB) unread, and
  `websocket.send` waits while the transport's write buffer is above its high-water mark;
* drain: `going_away()` closes with 1001 and the app hears `websocket.disconnect` with 1001; a client that
  never answers the close is cut after CLOSE_TIMEOUT, or by the runtime's drain deadline;
* keepalive (`--ws-ping-interval`, `--ws-ping-timeout`): a ping every interval; a peer from which nothing at all
  (pong or data) came back within the timeout is gone or stuck, so the app hears 1011 and the connection is
  closed without waiting for a close handshake it would not answer. Driven by the engine's once-a-second
  sweep (`tick`), like the HTTP timeouts: no timer per connection, no clock read per frame.

An open WebSocket is not a request in flight: its upgrade request counts as served once the app accepted,
and `server.websockets` counts the open ones (STATUS=, `clusterctl status`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.events import Request as WsRequest
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import RemoteProtocolError

from clusterctl.http.loop import settle
from clusterctl.http.protocol import error_response
from clusterctl.http.request import TARGETS, Request, split_target

log = logging.getLogger("clusterctl.websocket")

QUEUE_MESSAGES = 16          # unread messages before reading pauses
QUEUE_BYTES = 1 << 20        # unread bytes before reading pauses
DEFLATE_SLICE = 4096         # deflate inflates at most ~1032:1: a slice yields at most ~4 MiB
PLAIN_SLICE = 262144
CLOSE_TIMEOUT = 5.0          # seconds a client has to answer our close frame

# Session states: before the app answered the handshake, open, our close sent, gone.
CONNECTING, OPEN, CLOSING, CLOSED = range(4)


class ClientDisconnected(OSError):
    """`websocket.send` on a WebSocket that is closed or closing (ASGI asks for an OSError subclass)."""


def is_websocket(req: Request) -> bool:
    """A GET asking to upgrade to websocket (llhttp has already seen `Connection: upgrade`)."""
    if req.method != b"GET":
        return False
    return any(n.lower() == b"upgrade" and b"websocket" in v.lower() for n, v in req.headers)


class WebSocket:
    """One WebSocket connection: wsproto on the HTTP layer's transport, ASGI `receive`/`send` for the app."""

    __slots__ = ("accepted", "conn", "connect_sent", "deflate", "done_msg", "heard", "inbox", "inbox_bytes", "loop",
                 "max_size", "part_len", "parts", "paused", "ping_due", "pong_by", "proto", "req", "rx", "server",
                 "slice", "started", "state", "timer", "told", "waiter")

    def __init__(self, proto: Any, req: Request) -> None:  # proto: asgi.AsgiProtocol (no import cycle)
        self.proto = proto
        self.req = req
        self.server: Any = proto.server
        self.loop = proto.loop
        self.max_size: int = self.server.ws_max_size
        self.deflate: bool = self.server.ws_deflate
        self.conn = WSConnection(ConnectionType.SERVER)
        self.state = CONNECTING
        self.started = False
        self.accepted = False
        self.rx = bytearray()           # received, not yet given to wsproto
        self.slice = PLAIN_SLICE
        self.parts: list[Any] = []      # fragments of the message being received
        self.part_len = 0
        self.inbox: deque[tuple[dict[str, Any], int]] = deque()
        self.inbox_bytes = 0
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.connect_sent = False
        self.told = False               # websocket.disconnect queued for the app
        self.done_msg: dict[str, Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.heard = False              # bytes arrived since the last ping (any bytes prove the peer alive)
        self.ping_due = 0.0             # loop time of the next keepalive ping
        self.pong_by = 0.0              # loop time by which an unanswered ping must be answered; 0: none out

    # -- from the HTTP layer ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.heard = True
        self.rx += data
        if self.state == CONNECTING:
            self._flow()  # a client may not send frames before our 101: bound what it sends anyway
        else:
            self._process()

    def start(self) -> None:
        """The upgrade request's turn: the handshake through wsproto, then the app with a `websocket` scope."""
        self.started = True
        proto = self.proto
        req = self.req
        method, target, headers, version = req.method, req.target, req.headers, req.version
        if self.server.access_log is not None:
            proto.t0 = time.perf_counter()
            proto.req_line = f"GET {target.decode('latin-1')} HTTP/{version}"
        head = [method, b" ", target, b" HTTP/1.1\r\n"]
        for n, v in headers:
            head += (n, b": ", v, b"\r\n")
        head.append(b"\r\n")
        event = None
        try:
            if version != "1.1":
                raise RemoteProtocolError("WebSocket upgrade needs HTTP/1.1", event_hint=None)
            self.conn.receive_data(b"".join(head))
            event = next((e for e in self.conn.events() if isinstance(e, WsRequest)), None)
        except RemoteProtocolError as e:
            log.debug("bad WebSocket handshake: %s", e)
        if event is None:
            self.server.errors += 1
            self._reject(400)
            return
        t = TARGETS.get(target) or split_target(target)
        scope = proto.base_scope.copy()
        scope.update(type="websocket", scheme="ws", http_version=version,
                     path=t[0].encode("latin-1").decode("utf-8", "replace"), raw_path=target.partition(b"?")[0],
                     query_string=t[1].encode("latin-1"), headers=[(n.lower(), v) for n, v in headers],
                     subprotocols=list(event.subprotocols), state=self.server.state.copy())
        task = self.loop.create_task(self._run(scope))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def going_away(self) -> None:
        """The worker drains: close with 1001 (one still connecting is closed as soon as the app accepts it)."""
        if self.state == OPEN:
            self._close(1001, "server shutting down")

    def tick(self, now: float) -> None:
        """The engine's sweep: send the keepalive ping when due, and give up on a peer that left one unanswered
        for --ws-ping-timeout. While we do not read (the app is behind) the peer cannot be heard: not its fault."""
        if self.state != OPEN:
            return
        server = self.server
        if server.ws_ping_interval <= 0:
            return
        if self.heard or self.paused:
            self.heard = False
            self.pong_by = 0.0
        elif self.pong_by and now >= self.pong_by:
            self._expire()
            return
        if now >= self.ping_due:
            self._write(self.conn.send(Ping()))
            self.ping_due = now + server.ws_ping_interval
            if not self.pong_by:  # a later ping does not extend the deadline of one still unanswered
                self.pong_by = now + server.ws_ping_timeout

    def lost(self) -> None:
        """The transport is gone: the app hears 1006 unless a close code was already exchanged. A handshake
        the app has not answered stays CONNECTING: its accept raises ClientDisconnected and `_run` then
        ends the request (in flight until then)."""
        if self.state != CONNECTING:
            self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._disconnect(1006, "")
        if self.accepted:
            self.accepted = False
            self.server.websockets -= 1

    # -- the app --------------------------------------------------------------------------------------------
    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.proto.app(scope, self.receive, self.send)
        except Exception as e:
            if not isinstance(e, ClientDisconnected):  # the client left while the app sent: not the app's fault
                log.exception("error in ASGI app on WebSocket %s", scope["path"])
                self.server.errors += 1
            if self.state == CONNECTING:
                self._reject(500)
            else:
                self._close(1011, "internal error")
            return
        if self.state == CONNECTING:
            if not self.proto.closed:
                log.error("ASGI app returned without accepting or closing the WebSocket %s", scope["path"])
            self._reject(500)
        elif self.state == OPEN:
            self._close(1000, "")

    async def receive(self) -> dict[str, Any]:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        while not self.inbox:
            if self.done_msg is not None:
                return self.done_msg
            self.waiter = fut = self.loop.create_future()
            await fut
        msg, n = self.inbox.popleft()
        self.inbox_bytes -= n
        if msg["type"] == "websocket.disconnect":
            self.done_msg = msg
        elif self.paused and not self._full():
            self._process()  # what wsproto still holds, then reading resumes
        return msg

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.state == CONNECTING:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._reject(403)
            else:
                raise RuntimeError(f"ASGI message {kind!r} before websocket.accept")
            return
        if kind == "websocket.send":
            if self.state != OPEN:
                raise ClientDisconnected("the WebSocket is closed")
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                event: Message[Any] = BytesMessage(data=bytes(data))
            elif text is not None:
                event = TextMessage(data=text)
            else:
                raise ValueError("websocket.send needs 'bytes' or 'text'")
            self._write(self.conn.send(event))
            await self._drain()
        elif kind == "websocket.close":
            self._close(int(message.get("code") or 1000), message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket")

    def _accept(self, message: dict[str, Any]) -> None:
        proto = self.proto
        if proto.closed:
            raise ClientDisconnected("the client left before the WebSocket was accepted")
        headers = [(bytes(n).lower(), bytes(v)) for n, v in message.get("headers") or ()]
        extensions = [PerMessageDeflate()] if self.deflate else []
        self._write(self.conn.send(AcceptConnection(subprotocol=message.get("subprotocol"), extensions=extensions,
                                                    extra_headers=headers)))
        self.state = OPEN
        self.accepted = True
        server = self.server
        server.in_flight -= 1
        server.served += 1
        server.websockets += 1
        if server.access_log is not None:
            server.access_log(proto, 101, 0)
        self.ping_due = self.loop.time() + server.ws_ping_interval
        if any(e.enabled() for e in extensions):
            self.slice = DEFLATE_SLICE
        if server.draining:
            self._close(1001, "server shutting down")
        self._process()

    def _reject(self, status: int) -> None:
        """An HTTP answer instead of the upgrade (403: the app closed before accepting), then close."""
        self.state = CLOSED
        proto = self.proto
        self._write(error_response(status))
        proto.code = status
        if self.server.access_log is not None:
            self.server.access_log(proto, status, 0)
        self._disconnect(1006, "")
        proto.finish(False)

    # -- frames ---------------------------------------------------------------------------------------------
    def _process(self) -> None:
        """Give wsproto what was read, a slice at a time, and act on its events until the app is behind."""
        conn = self.conn
        while self.state in (OPEN, CLOSING) and not self._full():
            for event in conn.events():
                self._event(event)
                if self.state not in (OPEN, CLOSING) or self._full():
                    break
            else:
                if not self.rx:
                    break
                n = self.slice
                chunk = bytes(self.rx[:n])
                del self.rx[:n]
                conn.receive_data(chunk)
                continue
            break
        self._flow()

    def _event(self, event: Any) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            if self.state != OPEN:
                return  # the rest of a message after our close frame
            self.part_len += len(event.data)
            if self.part_len > self.max_size:
                self.parts.clear()
                self._close(1009, f"message larger than {self.max_size} bytes")
                return
            self.parts.append(event.data)
            if event.message_finished:
                if isinstance(event, TextMessage):
                    msg: dict[str, Any] = {"type": "websocket.receive", "text": "".join(self.parts)}
                else:
                    msg = {"type": "websocket.receive", "bytes": b"".join(self.parts)}
                self._deliver(msg, self.part_len)
                self.parts = []
                self.part_len = 0
        elif isinstance(event, Ping):
            if self.state == OPEN:
                self._write(self.conn.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.state == CLOSING:  # the client's answer to our close: done
                self._shut()
            elif self.conn.state is ConnectionState.REMOTE_CLOSING:
                self._write(self.conn.send(event.response()))  # the client closes: answer, then hang up
                self._disconnect(event.code, event.reason or "")
                self._shut()
            else:  # wsproto could not parse the stream (1002, 1007 ...): say so and close
                self._close(event.code, event.reason or "")

    def _close(self, code: int, reason: str) -> None:
        """Send our close frame; the app hears the same code; the client has CLOSE_TIMEOUT to answer."""
        if self.state != OPEN:
            return
        self._write(self.conn.send(CloseConnection(code=code, reason=reason)))
        self.state = CLOSING
        self._disconnect(code, reason)
        self.timer = self.loop.call_later(CLOSE_TIMEOUT, self.proto.abort)

    def _expire(self) -> None:
        """No answer to our ping: 1011 for the app and (best effort) the peer, then hang up at once: a peer that
        does not answer pings will not answer a close. Abort when even the close frame cannot be written (the
        peer stopped reading and our write buffer is full)."""
        reason = "keepalive ping timeout"
        if self.proto.write_paused:
            self.state = CLOSED
            self._disconnect(1011, reason)
            self.proto.abort()
            return
        self._write(self.conn.send(CloseConnection(code=1011, reason=reason)))
        self._disconnect(1011, reason)
        self._shut()

    def _shut(self) -> None:
        self.state = CLOSED
        self.proto.close()

    # -- flow -----------------------------------------------------------------------------------------------
    def _full(self) -> bool:
        if self.state == OPEN:
            return len(self.inbox) >= QUEUE_MESSAGES or self.inbox_bytes >= QUEUE_BYTES
        return self.state == CONNECTING and len(self.rx) >= QUEUE_BYTES

    def _flow(self) -> None:
        full = self._full()
        if full != self.paused and not self.proto.closed:
            self.paused = full
            if full:
                self.proto.transport.pause_reading()
            else:
                self.proto.transport.resume_reading()

    def _deliver(self, msg: dict[str, Any], n: int) -> None:
        self.inbox.append((msg, n))
        self.inbox_bytes += n
        fut, self.waiter = self.waiter, None
        settle(fut)

    def _disconnect(self, code: int, reason: str) -> None:
        if not self.told:
            self.told = True
            self._deliver({"type": "websocket.disconnect", "code": int(code), "reason": reason}, 0)

    def _write(self, data: bytes) -> None:
        if data and not self.proto.closed:
            self.proto.transport.write(data)

    async def _drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark (several senders may wait)."""
        proto = self.proto
        while proto.write_paused and not proto.closed:
            fut = proto.drained
            if fut is None or fut.done():
                proto.drained = fut = self.loop.create_future()
            await asyncio.shield(fut)
