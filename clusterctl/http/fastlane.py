"""The compiled fast lane (issue 21): a C protocol for the common WSGI request cycle, the Python engine behind it.

`clusterctl/http/_fast.c` is built by the package's build hook (hatch_build.py) when a C compiler and
Python's headers are there; without them, or with CLUSTERCTL_NO_COMPILE=1, the pure-Python engine runs.

The C type serves what it recognises (see _fast.c) and calls back here for everything else: `_handoff`
moves the connection to the Python protocol with the bytes not yet parsed; `_adopt` lets the Python
protocol finish a response whose app already ran (a stream, a file, write(), an exception). The methods
below are the cold ones the Server calls on every connection it holds (timeouts, drain, make_room).
"""

from __future__ import annotations

import io
from typing import Any

from clusterctl.http.protocol import IDLE, Limits, error_response
from clusterctl.http.request import TARGETS, Request, split_target
from clusterctl.http.response import ResponseWriter
from clusterctl.http.server import ENGINES
from clusterctl.http.wsgi import EMPTY_INPUT, ENV_KEYS, WsgiProtocol, WsgiServer, env_key, wsgi_head

try:
    from clusterctl.http import _fast
except ImportError as e:  # not built: no compiler, CLUSTERCTL_NO_COMPILE=1, or a build for another Python
    _fast = None
    _WHY = f"the compiled engine is not built ({e}); install gcc and python3-dev and reinstall to get it"
else:
    _WHY = ""
    _fast.configure(TARGETS, split_target, ENV_KEYS, env_key, EMPTY_INPUT, io.BytesIO)



def available() -> bool:
    return _fast is not None


def why_not() -> str:
    """One line for the worker's log when the compiled engine is not available; "" when it is."""
    return _WHY


class _Written:
    """What an app gave PEP 3333's write() before returning, then its iterable: one response body."""

    def __init__(self, written: list[bytes], result: Any) -> None:
        self.written = written
        self.result = result

    def __iter__(self) -> Any:
        yield from self.written
        yield from self.result

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None:
            close()


if _fast is not None:
    class FastWsgi(_fast.Conn):  # type: ignore[misc,name-defined]
        """The compiled protocol plus the attributes and cold paths the Server and the hand-off need."""

        __slots__ = ()
        # What Server.make_room() and the runtime read of every connection: between reads a compiled
        # connection is never lingering, streaming or holding a body, and has no queue.
        lingering = streaming = body_held = multithread = False
        queue = ()

        # -- cold paths, called from C --------------------------------------------------------------------
        def _over_cap(self) -> bool:
            """Over --max-connections: free a slot (the Python protocol's make_room), else answer 503."""
            server = self.server
            if server.make_room(self):
                return False
            server.rejected += 1
            self.transport.write(error_response(503, extra="retry-after: 1\r\n"))
            self.close()
            return True

        def _env_base_for(self, sockname: Any) -> dict[str, Any]:
            base = WsgiProtocol._env_base(self, sockname)  # type: ignore[arg-type]  # reads only .multithread
            bases = self.server.env_bases
            if len(bases) < 64:
                bases[sockname] = base
            return base

        def _lookup_head(self) -> Any:
            if self.status is None:
                raise RuntimeError("app returned without calling start_response()")
            return ResponseWriter.lookup_head(self, self.status, self.resp_headers, wsgi_head)  # type: ignore[arg-type]  # reads .server

        def _python(self) -> WsgiProtocol:
            """The Python protocol takes this connection over from here on."""
            server = self.server
            server.connections.discard(self)
            self.detached = True
            # The app may hold us as its start_response/write (a generator calls it later): they forward to p.
            self.adopted = p = WsgiProtocol(server)
            transport = self.transport
            p.connection_made(transport)  # the slot this one held: no cap check can fail here
            if self.write_paused:  # the transport told us; it will tell p when it resumes
                p.pause_writing()
            transport.set_protocol(p)
            return p

        def _handoff(self, rest: bytes) -> None:
            """Bytes this lane does not serve: the Python protocol parses them (llhttp and its defences)."""
            self._python().data_received(rest)

        def _adopt(self, req: tuple[bytes, bytes], keep: bool, status: Any, headers: Any, result: Any,
                   written: list[bytes] | None, exc: BaseException | None, rest: bytes) -> None:
            """The app ran here but its response is not the fast shape: the Python protocol sends it, exactly
            as if it had called the app (WsgiProtocol.handle after the app call), then serves `rest`."""
            p = self._python()
            server = self.server
            p.got_bytes = True
            p.phase = IDLE
            p.busy = True  # in_flight was counted by the C side; p.finish() counts it back
            p.status = status
            p.resp_headers = headers if headers is not None else []
            p.head_sent = False
            p.resp_bytes = 0
            p.keep = keep
            p.rversion = "1.1"
            p.is_head = False
            p.t0 = self.t0
            p.req_line = self.req_line or f"{req[0].decode('latin-1')} {req[1].decode('latin-1')} HTTP/1.1"
            p.cur_req = Request.make(req[0], req[1], [], b"", keep)
            server.app_req = p.cur_req
            try:
                if exc is not None:
                    try:
                        raise exc  # _app_error logs the exception being handled
                    except Exception:
                        p._app_error(result)
                    finally:
                        exc = None  # its traceback holds this frame: no cycle left for the collector
                else:
                    p._respond(_Written(written, result) if written else result)
            finally:
                server.app_req = None
            if rest:
                p.data_received(rest)

        # -- what the Server calls on each connection -------------------------------------------------------
        def check_timeout(self, now: float, lim: Limits) -> None:
            if self.write_paused:
                if now - self.since > lim.body_timeout:
                    self.abort()
                return
            if self.closed:
                return
            if self.phase == IDLE:
                if now - self.since > lim.keepalive_timeout:
                    self.close()
            elif self.server.draining and now - self.since > 1.0:
                self.close()  # connected, never sent a byte: does not hold up the drain
            elif now - self.since > lim.header_timeout:
                self.close()

        def drain(self) -> None:
            if self.phase == IDLE and self.got_bytes:
                self.close()

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                self.transport.close()

        def abort(self) -> None:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

        def _fail(self, err: Exception) -> None:
            """make_room() on a connection that sent bytes: a compiled one holds none between reads."""
            self.close()


def install(server: WsgiServer) -> bool:
    """Serve this Server's new connections with the compiled protocol; False (nothing changed) where it does
    not apply: not built, an ASGI server, --threads, or a proxied protocol (--forwarded-allow-ips,
    --proxy-protocol), all of which stay on the Python protocol."""
    if _fast is None or type(server) is not WsgiServer or server.threads or server.conn_class is not WsgiProtocol:
        return False
    server.conn_class = FastWsgi  # this server only
    return True


def choose(server: WsgiServer, engine: str = "auto") -> tuple[str, str]:
    """--engine auto|compiled|python for a WSGI Server: (the engine now serving it, a line for the log).
    "compiled" where it cannot be used raises RuntimeError (the worker should exit with that message)."""
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine != "python" and install(server):
        return "compiled", "engine: compiled (clusterctl/http/_fast.c), the Python engine for the rest"
    if engine == "python":
        return "python", "engine: python (--engine python)"
    why = why_not() or "the compiled engine serves plain WSGI only (no --threads, no proxy headers)"
    if engine == "compiled":
        raise RuntimeError(f"--engine compiled: {why}")
    return "python", f"engine: python ({why})"


__all__ = ["ENGINES", "available", "choose", "install", "why_not"]
