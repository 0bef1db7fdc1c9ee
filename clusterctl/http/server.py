"""State shared by all connections of one worker: limits, counters, the clock and Date line, the drain.

`Server` is adapter-neutral; wsgi.py and asgi.py subclass it with what their protocol needs and set
`protocol_class`. Lifecycle (signals, notify, drain deadline) lives in the worker runtime: here are only the
hooks it calls (`serve`, `begin_drain`, `force_close`, `close`) and the counters it reports.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from clusterctl.http.protocol import IDLE, HttpProtocol, Limits
from clusterctl.http.request import Reject, Request

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(now: float) -> str:
    """RFC 9110 IMF-fixdate, without importing the email package (a worker's resident memory counts)."""
    t = time.gmtime(now)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


# The HTTP engines a WSGI worker can serve with (--engine): here, where loading them costs nothing, so that the
# worker's option table can check the word without loading the compiled lane (fastlane.choose picks one).
ENGINES = ("auto", "compiled", "python")


class Server:
    """One worker's connections and what they share. Slots: the hot path reads a dozen of these per request."""

    __slots__ = ("_second", "_ticker", "access_log", "app", "app_req", "app_steps", "beats", "buffered", "clock",
                 "conn_class", "connections", "date_line", "draining", "errors", "head_cache", "heads", "in_flight",
                 "limits", "listeners", "loop", "loop_thread", "on_recycle", "proxy_protocol", "recycle_at", "rejected",
                 "running", "served", "server_header", "tick_interval", "trusted")

    protocol_class: type[HttpProtocol]  # the adapter's protocol, set by each subclass

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop, limits: Limits | None = None, *,
                 access_log: Callable[..., None] | None = None, server_header: str = "clusterctl") -> None:
        self.app = app
        self.loop = loop
        # The class each connection gets: the adapter's, or a subclass of it (threads, behind_proxy()).
        self.conn_class: type[HttpProtocol] = type(self).protocol_class
        self.limits = limits or Limits()
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
        # The response writer's compiled heads (response.py): (status, headers) -> Head, and the last Head
        # per status, found again without hashing the headers.
        self.head_cache: dict[Any, Any] = {}  # response.Head values
        self.heads: dict[Any, Any] = {}
        self.listeners: list[asyncio.AbstractServer] = []
        self.loop_thread = threading.get_ident()
        # For the runtime's monitor thread (watchdog.py): the request whose app code runs on the loop thread
        # now (adapters that run app code inline set it), each request thread's (request, start time), a
        # count of streamed chunks (each is timed on its own) and of housekeeping ticks (a blocked loop stops
        # them).
        self.app_req: Request | None = None
        self.running: dict[int, tuple[Request, float]] = {}
        self.app_steps = 0
        self.beats = 0
        self.recycle_at = -1  # served count at which on_recycle fires (--max-requests)
        self.on_recycle: Callable[[], None] | None = None
        self._ticker: asyncio.TimerHandle | None = None
        lim = self.limits
        self.tick_interval = max(0.02, min(1.0, lim.keepalive_timeout / 4, lim.header_timeout / 4,
                                           lim.body_timeout / 4))
        self._update_date()

    def protocol(self) -> HttpProtocol:
        return self.conn_class(self)

    def behind_proxy(self, trusted: Any, proxy_protocol: bool) -> None:
        """--forwarded-allow-ips (a proxy.Trusted) / --proxy-protocol. Connections get a subclass that reads the
        PROXY header and the trusted forwarded headers; with neither set the plain class runs, at no cost (and
        proxy.py is never imported)."""
        self.trusted = trusted
        self.proxy_protocol = proxy_protocol
        if trusted is not None or proxy_protocol:
            from clusterctl.http.proxy import proxied

            self.conn_class = proxied(self.conn_class)

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
            slow.fail(Reject(503, "connections ran short: the slowest client makes room"))
            if not slow.closed:
                slow.close()
        else:
            slow.close()
        return True

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
