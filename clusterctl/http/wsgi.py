"""WSGI (PEP 3333) as a thin adapter over the HTTP layer: environ in, framed response out.

`WsgiProtocol` turns one `Request` into an environ, calls the app inline on the event loop's thread and
hands what it returns to `ResponseWriter` (Content-Length when known, chunked otherwise, HEAD/204/304
without a body, sendfile for `wsgi.file_wrapper`). One app call at a time per worker, as under a sync
server: that is what makes it fast, and the runtime hides the running loop from app code
(`loop.hide_running_loop`) so Django's ORM, asgiref and asyncio.run() in a view behave as under gunicorn's
sync worker. A streamed response (an iterable of unknown length) is sent one chunk per loop turn, so each
chunk is flushed, a client that left is noticed and the iterable closed, and no other request's app code
runs in between: the app is one "slot" per worker (`WsgiServer.app_owner`), and requests that arrive
meanwhile wait for it. `ThreadedWsgiProtocol` (--threads N) runs each app call in a thread pool instead,
for apps that block on I/O.

Hot path: the environ is a copy of a per-connection base dict with header names mapped through a bounded
cache; the common response (one bytes body, keep-alive HTTP/1.1) takes one fast path whose complete head
is cached per body length (`response.Head.full_head`) and sent with one transport.write().
"""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from clusterctl.http.request import CACHE_MAX, METHODS, TARGETS, Request, method_name, split_target
from clusterctl.http.response import (
    F_CHUNKED,
    F_LENGTH,
    F_NONE,
    JOIN_MAX,
    Head,
    ResponseWriter,
    compile_head,
    error_response,
)
from clusterctl.http.server import Limits, Server

log = logging.getLogger("clusterctl.engine")

# The hot path calls methods through module-level names bound here: CPython 3.11 compiles `name.method()` to a
# generic, unspecializable attribute lookup when `name` was imported, and to LOAD_METHOD (or one global) when not.
_methods = METHODS.get
_targets = TARGETS.get

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WsgiServer(Server):
    """A `Server` whose connections speak WSGI: the app slot, the thread pool (--threads), environ bases."""

    __slots__ = ("app_owner", "app_waiting", "env_bases", "executor", "threads")

    def __init__(self, app: WSGIApp, loop: Any, limits: Limits | None = None, *, threads: int = 0,
                 access_log: Callable[..., None] | None = None, server_header: str = "clusterctl") -> None:
        super().__init__(app, loop, limits, access_log=access_log, server_header=server_header)
        self.threads = threads
        self.executor: Any = None
        if threads > 0:  # imported here: most workers run the app inline and never pay for it
            from concurrent.futures import ThreadPoolExecutor

            self.executor = ThreadPoolExecutor(threads, thread_name_prefix="wsgi")
            self.conn_class = ThreadedWsgiProtocol
        self.env_bases: dict[Any, dict[str, Any]] = {}  # local address -> the environ's fixed part
        # The app slot (inline mode): the connection whose streamed response holds it between loop turns, and
        # the requests waiting for it.
        self.app_owner: WsgiProtocol | None = None
        self.app_waiting: deque[tuple[WsgiProtocol, Request, bool]] = deque()

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

    def close(self) -> None:
        super().close()
        if self.executor:
            self.executor.shutdown(wait=False, cancel_futures=True)


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


EMPTY_INPUT = _EmptyInput()
# Request header name as sent -> environ key; "" for names dropped.
ENV_KEYS: dict[bytes, str] = {}
_UNDERSCORE = 0x5F


def env_key(name: bytes) -> str:
    low = name.lower()
    if low == b"content-type":
        key = "CONTENT_TYPE"
    elif low == b"content-length":
        key = "CONTENT_LENGTH"
    elif _UNDERSCORE in name:  # X_Forwarded_For must not alias X-Forwarded-For (header spoofing)
        key = ""
    else:
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    if len(ENV_KEYS) < CACHE_MAX:
        ENV_KEYS[name] = key
    return key



def wsgi_head(status: str, headers: list[tuple[str, str]]) -> Head:
    """Validate and compile a WSGI status and header list (PEP 3333: native strings)."""
    if type(status) is not str or len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
        raise ValueError(f"invalid WSGI status {status!r}")
    if "\n" in status or "\r" in status:
        raise ValueError("status contains a line break")
    fields = []
    for name, value in headers:
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"response header {name!r}: {value!r} must be str")
        # A name outside latin-1 becomes "?", which is no token: refused as an invalid name.
        fields.append((name.encode("latin-1", "replace"), value.encode("latin-1")))
    return compile_head(int(status[:3]), f"HTTP/1.1 {status}\r\n".encode("latin-1"), fields, list(headers))


def _closed(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the connection is closed")


_SENDFILE = object()  # resp_iter while a file goes out with os.sendfile
_ON_THREAD = object()  # what ThreadedWsgiProtocol's app call returns on the loop thread



_writer_init = ResponseWriter.__init__


class WsgiProtocol(ResponseWriter):
    """PEP 3333 on the HTTP layer, the app called inline. One response at a time per connection, in order."""

    __slots__ = ("app", "base_env", "cur_req", "resp_headers", "resp_iter", "resp_result", "sf", "start_response",
                 "status", "write_cb")

    server: WsgiServer
    multithread = False  # wsgi.multithread

    def __init__(self, server: WsgiServer) -> None:
        _writer_init(self, server)  # not super(): no super object per connection (close mode)
        self.app = server.app
        # Bound once, not per request; they refer back to us, so on_lost() lets go of them (see there).
        self.start_response = self._start_response
        self.write_cb = self._write_legacy
        self.base_env: dict[str, Any] = {}
        self.status: str | None = None
        self.resp_headers: list[tuple[str, str]] = []
        self.resp_iter: Any = None
        self.resp_result: Any = None
        self.cur_req: Request | None = None  # the request of a response in _respond/_pump (the monitor names it)
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

    def saved_view(self) -> Any:
        return self.base_env

    def client_addr(self) -> str:
        return self.base_env["REMOTE_ADDR"]

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
            "wsgi.multithread": self.multithread, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True,
        }

    # -- environ ----------------------------------------------------------------------------------------
    def build_environ(self, req: Request) -> dict[str, Any]:
        method = req.method
        target = req.target
        body = req.body
        env = self.base_env.copy()
        env["REQUEST_METHOD"] = _methods(method) or method_name(method)
        if req.version != "1.1":
            env["SERVER_PROTOCOL"] = "HTTP/1.0"
        t = _targets(target) or split_target(target)
        env["PATH_INFO"] = t[0]
        env["QUERY_STRING"] = t[1]
        env["RAW_URI"] = t[2]
        keys = ENV_KEYS
        setdefault = env.setdefault
        for name, value in req.headers:
            key = keys.get(name)
            if not key:
                if key is None:
                    key = env_key(name)
                if not key:
                    continue
            v = value.decode("latin-1")
            old = setdefault(key, v)
            if old is not v:  # repeated header: merge per RFC 9110 (cookies with "; ")
                env[key] = old + ("; " if key == "HTTP_COOKIE" else ",") + v
        if body or req.cl_given:
            env["CONTENT_LENGTH"] = str(len(body))
            env["wsgi.input"] = io.BytesIO(body)
        else:
            env["wsgi.input"] = EMPTY_INPUT
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
                self.send(error_response(400))
                self.finish(False)
                return
            self.status = None
            self.head_sent = False
            self.resp_bytes = 0
            self.keep = keep_alive
            self.rversion = version = req.version
            self.is_head = is_head = req.method == b"HEAD"
            if server.access_log is not None:
                self.t0 = time.perf_counter()
                self.req_line = f"{env['REQUEST_METHOD']} {env['RAW_URI']} {env['SERVER_PROTOCOL']}"
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
                    # The cached head under the current Date line, without a call (the dict get is Head.full_head's
                    # first step, inline: a call here costs 1.3% of a keep-alive request); full_head() fills it.
                    full = h.full.get(key) if h.date is server.date_line else None
                    if full is None:
                        full = h.full_head(server.date_line, key)
                    if full is not None:
                        if not self.closed:
                            if n < JOIN_MAX:
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
                if self.framing == F_NONE:
                    self.send(head)
                elif len(body) < JOIN_MAX:
                    self.send(head + self.frame(body))
                else:  # no copy of a big body
                    self.send(head)
                    self.send(self.frame(body))
                self._done()
                return
            if rtype is FileWrapper and self._try_sendfile(result):
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
                if self.framing != F_NONE:
                    self.send(self.frame(chunk))
                if self._later():
                    return
        except Exception:
            self._app_error(self.resp_result)
            return
        self.resp_iter = None
        try:
            if not self.head_sent and not self.closed:
                if self.status is None:
                    raise RuntimeError("app returned without calling start_response()")
                self.send(self._head(0))
            elif self.framing == F_CHUNKED and not self.closed:
                self.send(b"0\r\n\r\n")
        except Exception:
            self._app_error(self.resp_result)
            return
        self._done()

    def _later(self) -> bool:
        """After a chunk: whether the rest of the body goes on a later loop turn (`_step`), the app slot held
        meanwhile: always while body is owed, and while the client does not read (resume_writing -> on_writable
        -> _step)."""
        if self.framing != F_NONE and (self.framing != F_LENGTH or self.remaining > 0):
            self.server.app_owner = self
            if not self.write_paused:
                self.loop.call_soon(self._step)
            return True
        return self.write_paused

    def on_writable(self) -> None:
        if self.resp_iter is _SENDFILE and self.busy:
            self._sendfile_step()
        elif self.resp_iter is not None and self.busy:
            self._step()
        elif not self.busy:
            self.run_queue()

    def on_lost(self) -> None:
        if self.busy and self.resp_iter is not None:
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
    def _lookup_head(self) -> Head:
        """The compiled head of the app's start_response() (the callers looked at the last one for the status)."""
        status = self.status
        if status is None:
            raise RuntimeError("app returned without calling start_response()")
        return self.lookup_head(status, self.resp_headers, wsgi_head)

    def _head(self, body_len: int | None) -> bytes:
        """Response head bytes; decides framing. `body_len` is the whole body's size when known."""
        h = self.server.heads.get(self.status)  # type: ignore[arg-type]
        if h is None or h.headers != self.resp_headers:
            h = self._lookup_head()
        return self.framed_head(h, body_len)

    def _write_legacy(self, data: bytes) -> None:
        """The write() callable returned by start_response (PEP 3333's imperative API)."""
        if type(data) is not bytes:
            raise TypeError("write() takes bytes")
        if not self.head_sent:
            self.send(self._head(None))
        if data and self.framing != F_NONE:
            self.send(self.frame(data))

    # -- sending ------------------------------------------------------------------------------------------
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
        count = min(size, self.remaining) if self.framing == F_LENGTH else 0
        if self.framing == F_LENGTH and count < self.remaining:
            self.keep = False  # file shorter than the app's Content-Length: the client must see EOF
        self.send(head)
        self.resp_bytes += count
        if self.framing == F_LENGTH:
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
        keep = self.keep and self.complete()  # less than its Content-Length: only closing keeps the framing honest
        if self.server.access_log is not None:
            self.server.access_log(self, self.code, self.resp_bytes)
        self._finish(keep)

    def _app_error(self, result: Any) -> None:
        log.exception("error in WSGI app handling %s", self.req_line or "a request")
        self.resp_iter = None
        if result is not None:
            self._close_result(result)
        self.resp_result = None
        if self.server.app_owner is self:
            self._release_app()
        keep = self.error_head()
        if self.server.access_log is not None:
            self.server.access_log(self, 500, 0)
        self._finish(keep)

    _finish = ResponseWriter.finish  # the response is complete (ThreadedWsgiProtocol: from any thread)


class ThreadedWsgiProtocol(WsgiProtocol):
    """--threads N: each app call runs on a pool thread; writes hop back to the loop thread, waiting while the
    client does not read (`writable`)."""

    __slots__ = ("writable",)

    multithread = True

    def __init__(self, server: WsgiServer) -> None:
        WsgiProtocol.__init__(self, server)
        self.app = self._submit
        self.writable = threading.Event()  # set while the transport takes writes
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.writable.set()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()
        super().resume_writing()

    # handle() is WsgiProtocol's: the "app" it calls is _submit, which hands the call to a pool thread.
    def _submit(self, env: dict[str, Any], start_response: Any) -> Any:
        self.server.executor.submit(self._run_threaded, env, self.server.app_req)
        return _ON_THREAD

    def _respond(self, result: Any) -> None:
        if result is not _ON_THREAD:
            WsgiProtocol._respond(self, result)

    def _run_threaded(self, env: dict[str, Any], req: Request) -> None:
        running = self.server.running
        ident = threading.get_ident()
        running[ident] = (req, time.monotonic())  # the monitor thread bounds it by --timeout
        try:
            try:
                result = self.server.app(env, self.start_response)
            except Exception:
                self._app_error(None)
                return
            self._respond(result)
        except BaseException:  # never let a worker thread die silently
            log.exception("request thread failed")
        finally:
            running.pop(ident, None)

    def on_writable(self) -> None:
        if not self.busy:
            self.run_queue()

    def on_lost(self) -> None:
        if not self.busy:
            self.start_response = self.write_cb = self.app = _closed

    def send(self, data: bytes) -> None:
        if threading.get_ident() == self.server.loop_thread:
            if not self.closed:
                self.transport.write(data)
            return
        self.writable.wait(self.limits.body_timeout)
        if not self.closed:
            self.loop.call_soon_threadsafe(self._write_now, data)

    def _write_now(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def _try_sendfile(self, wrapper: FileWrapper) -> bool:
        return False  # os.sendfile from a pool thread would race the loop's writes: iterate the file instead

    def _later(self) -> bool:
        return False  # send() waits for the client on the pool thread: the whole body goes in this call

    def _finish(self, keep: bool) -> None:
        if threading.get_ident() != self.server.loop_thread:
            self.loop.call_soon_threadsafe(self.finish, keep)
        else:
            self.finish(keep)


WsgiServer.protocol_class = WsgiProtocol
