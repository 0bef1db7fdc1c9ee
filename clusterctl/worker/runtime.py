"""Worker lifecycle: the one room for signals, notify, drain and recycling (like gunicorn's arbiter).

Order of events, and why:
1. take the sockets first (listen_fds unsets LISTEN_*, so nothing the app spawns inherits them);
2. import the app with the working directory on sys.path (WorkingDirectory= in the unit);
3. ASGI apps: lifespan startup (a failure exits non-zero, so systemd's restart policy applies);
   serve the sockets, then READY=1: `systemctl restart` returns on READY, so a rolling reload only
   moves on once this worker really answers;
4. STATUS= once a second; WATCHDOG=1 and --timeout from the monitor thread (watchdog.py): a request whose
   app code runs past --timeout is named in the journal and the worker replaced; a loop blocked anywhere
   else stops the pings and systemd's watchdog restarts the worker;
5. SIGTERM/SIGINT: STOPPING=1, stop accepting, let in-flight and already-read requests finish, close
   idle keep-alive connections, exit 0; a second signal or --drain-timeout force-closes and exits 1.
   --max-requests takes the same path and exits 0 (the unit's Restart= brings a fresh process).
   ASGI lifespan shutdown runs after the drain, within what is left of the drain deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from clusterctl import appspec, probe, statusline
from clusterctl.errors import ClusterctlError
from clusterctl.http import asgi
from clusterctl.http.loop import hide_running_loop
from clusterctl.http.wsgi import WSGIApp, WsgiServer
from clusterctl.worker import handover, notify, options
from clusterctl.worker.accesslog import AccessLog, LogHandler
from clusterctl.worker.inbox import Inbox
from clusterctl.worker.options import WorkerConfig
from clusterctl.worker.watchdog import Monitor

log = logging.getLogger("clusterctl.worker")


WX_FIX = ("the unit sets MemoryDenyWriteExecute=yes (the default), which forbids the writable+executable memory "
          "this needs (cffi's ABI-mode ffi.callback(), JITs): regenerate the units with `clusterctl generate ... "
          "--allow-wx`, or use cffi's API mode (@ffi.def_extern()), which needs none")


def needs_wx(exc: BaseException | None) -> bool:
    """Whether an exception (or one it came from) is a refused writable+executable mapping, as cffi words it
    ("Cannot allocate write+execute memory for ffi.callback()")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "write+execute" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class WxHint(logging.Filter):
    """Adds WX_FIX to a logged exception that needs W+X memory: an app creating a cffi callback while it
    serves gets a 500 and this line in the journal, not a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and needs_wx(record.exc_info[1]) and not getattr(record, "wx_hint", False):
            record.msg = f"{record.msg} (fix: {WX_FIX})"
            record.wx_hint = True
        return True


def load_app(spec: str) -> WSGIApp:
    """Import MODULE:CALLABLE (CALLABLE defaults to `app`), the current directory first on sys.path."""
    return appspec.load(spec, os.getcwd(), default_attr="app", fix_for=lambda e: WX_FIX if needs_wx(e) else None)


def take_sockets(cfg: WorkerConfig) -> list[Any]:
    """Sockets from systemd, else from --bind, else a clear error saying how to get some."""
    socks = notify.listen_fds()
    if cfg.bind:
        if socks:
            log.warning("ignoring --bind: systemd passed %d socket(s)", len(socks))
        else:
            socks = [notify.bind(addr, cfg.backlog) for addr in cfg.bind]
    if not socks:
        raise ClusterctlError("no listening sockets: systemd passed none (LISTEN_FDS unset) and no --bind",
                              notify.NO_SOCKETS_FIX)
    return socks


class Runtime:
    """One worker process: serves, reports to systemd, drains on signals."""

    def __init__(self, cfg: WorkerConfig, app: WSGIApp, socks: list[Any], interface: str = "wsgi") -> None:
        self.cfg = cfg
        self.interface = interface
        self.app = app
        self.socks = socks
        self.loop = self._new_loop(cfg.loop)
        limits = cfg.limits()
        self.access = (AccessLog(self.loop, cfg, journal=cfg.journal and notify.under_systemd())
                       if cfg.access_log else None)
        self.lifespan: asgi.Lifespan | None = None
        if interface == "asgi":
            if cfg.threads:
                log.warning("--threads %d ignored: ASGI apps run on the event loop", cfg.threads)
            self.server = asgi.AsgiServer(app, self.loop, limits, access_log=self.access)
            self.server.ws_max_size = cfg.ws_max_size
            self.server.ws_deflate = cfg.ws_per_message_deflate
            self.server.ws_keepalive(cfg.ws_ping_interval, cfg.ws_ping_timeout)
            self.lifespan = asgi.Lifespan(app, self.server.state, self.loop)  # type: ignore[arg-type]
        else:
            self.server = WsgiServer(app, self.loop, limits, threads=cfg.threads, access_log=self.access)
            hide_running_loop(self.loop)  # WSGI app code sees no running loop, as under a sync server
        if cfg.forwarded_allow_ips or cfg.proxy_protocol:
            from clusterctl.http.proxy import parse_trusted

            self.server.behind_proxy(parse_trusted(cfg.forwarded_allow_ips), cfg.proxy_protocol)
        if cfg.max_requests > 0:
            import random  # only with --max-requests: not resident in every worker

            self.server.recycle_at = cfg.max_requests + random.randint(0, max(0, cfg.max_requests_jitter))
            self.server.on_recycle = self.recycle
        self.engine = self._choose_engine(cfg.engine)  # last: a proxied or threaded server stays on Python
        self.done: asyncio.Future[int] = self.loop.create_future()
        self.draining = False
        self.deadline = 0.0
        self.last_status = ""
        self.notifying = notify.enabled()
        self.inbox: Inbox | None = None
        self.monitor: Monitor | None = None
        # In-place reload (handover.py): our control socket, and our side of a hand-over when the
        # reload helper started us to replace a running process.
        self.control: handover.Control | None = None
        self.successor: handover.Successor | None = None

    @staticmethod
    def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
        if kind == "uvloop":
            import uvloop

            return uvloop.new_event_loop()
        if kind == "asyncio":
            return asyncio.new_event_loop()
        raise ClusterctlError(f"unknown --loop {kind!r}", "use uvloop or asyncio")

    def run(self) -> int:
        loop = self.loop
        # Not made the thread's current loop: WSGI app code runs with the loop hidden (engine.py), and an app
        # calling asyncio.get_event_loop() there gets a loop of its own, as under a sync server.
        try:
            # One run_until_complete for the whole life: uvloop pauses its signal wake-up between runs,
            # and a SIGTERM landing in such a gap would be lost.
            code = loop.run_until_complete(self._main())
        finally:
            if self.monitor is not None:
                self.monitor.stop()
            if self.access is not None:
                self.access.close()
            self.server.close()
            if self.inbox is not None:  # messaging hook
                self.inbox.close()
            if self.control is not None:  # in-place reload hook
                self.control.close()
            loop.close()
        log.info("exiting with %d", code)
        return code

    async def _main(self) -> int:
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):  # before serving: no window for a default death
            loop.add_signal_handler(sig, self.on_signal, sig)
        staged = self.successor is not None
        if self.successor is not None:
            self.successor.attach(self)
        # messaging hook: bind /run/NAME/worker-I.sock and load the saved state before serving and READY=1
        self.inbox = Inbox.start(loop, self.cfg.instance, staged=staged)
        self.control = handover.Control.start(self, self.cfg.instance, staged=staged)  # in-place reload hook
        if self.lifespan is not None:
            await self.lifespan.startup()
        if self.cfg.ready_path:
            await self._wait_ready(self.cfg.ready_path)
        await self.server.serve(self.socks, self.cfg.backlog)
        if self.draining:  # a signal arrived while we were starting
            self.server.stop_accepting()
        where = ", ".join(notify.describe(s) for s in self.socks)
        log.info("serving %s on %s (pid %d)", self.cfg.app, where, os.getpid())
        if self.successor is not None and not await self.successor.take_over():
            return await self._finish_successor(await self.done)  # the reload was abandoned: drained, not main
        self.notifying = notify.enabled()
        notify.notify(ready=True, status=f"serving {self.cfg.app} on {where}")
        if self.notifying:
            loop.call_later(1.0, self._status)
        self.monitor = Monitor(self.server, timeout=self.cfg.timeout, watchdog=notify.watchdog_interval(),
                               instance=self.cfg.instance)
        self.monitor.start()
        if self.cfg.max_memory_restart > 0:
            self._memory_check(os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC), os.sysconf("SC_PAGE_SIZE"),
                               first=True)
        code = await self.done
        if self.lifespan is not None:
            code = await self._shutdown_lifespan(code)
        return await self._finish_successor(code)

    async def _finish_successor(self, code: int) -> int:
        """A process that replaced another in place waits for it before exiting (see handover.py)."""
        if self.successor is not None:
            await self.successor.wait_predecessor(self.cfg.drain_timeout + 5)
        return code

    async def _wait_ready(self, path: str) -> None:
        """--ready-path: the app's own readiness check, asked through our engine over a socketpair (so WSGI
        and ASGI apps, middleware included, answer it as they would a client) before the socket is served
        and READY=1 sent. Not ready: retried every 0.5 s, said in STATUS= and the log; systemd's
        TimeoutStartSec= bounds the wait, and a SIGTERM meanwhile ends it."""
        attempt = 0
        while not self.draining:
            attempt += 1
            answer = await self._probe(path)
            if probe.healthy(answer):
                log.info("ready: GET %s answered %s", path, answer)
                return
            if attempt == 1 or attempt % 20 == 0:
                log.warning("not ready: GET %s answered %s; asking again every 0.5 s", path, answer)
            notify.notify(status=f"waiting for GET {path} to answer 2xx (last: {answer})")
            await asyncio.sleep(0.5)

    async def _probe(self, path: str, timeout: float = 10.0) -> str:
        """One GET through a fresh in-process connection: the status line's code and reason, or why not."""
        loop = self.loop
        ours, theirs = socket.socketpair()
        transport = None
        try:
            transport, _ = await loop.connect_accepted_socket(self.server.protocol, ours)
            theirs.setblocking(False)
            await loop.sock_sendall(theirs, probe.request(path))
            head = b""
            while b"\r\n" not in head:
                chunk = await asyncio.wait_for(loop.sock_recv(theirs, 4096), timeout)
                if not chunk:
                    break
                head += chunk
            return probe.answer(head)
        except (OSError, TimeoutError) as e:
            return f"no response ({e or type(e).__name__})"
        finally:
            theirs.close()
            if transport is not None:
                transport.close()
            else:
                ours.close()

    async def _shutdown_lifespan(self, code: int) -> int:
        """Lifespan shutdown after the drain, bounded by what is left of the drain deadline."""
        assert self.lifespan is not None
        left = max(0.1, self.deadline - self.loop.time()) if self.deadline else self.cfg.drain_timeout
        try:
            await self.lifespan.shutdown(left)
        except TimeoutError:
            log.warning("ASGI lifespan shutdown did not finish within the drain deadline")
            return code or 1
        except ClusterctlError as e:
            log.error("%s", e)
            return code or 1
        return code

    # -- periodic notify ---------------------------------------------------------------------------------
    def _choose_engine(self, engine: str) -> str:
        """--engine: the compiled lane (clusterctl/http/_fast.c) in front of the Python protocol where it was built
        and applies (plain WSGI, no --threads, no proxy headers), said in one log line either way."""
        if not isinstance(self.server, WsgiServer):
            if engine == "compiled":
                raise ClusterctlError("--engine compiled: the compiled engine serves WSGI apps; this app is ASGI",
                                      "use --engine auto or --engine python")
            return "python"
        from clusterctl.http import fastlane

        try:
            chosen, line = fastlane.choose(self.server, engine)
        except RuntimeError as e:
            raise ClusterctlError(str(e), "use --engine auto (the compiled lane where it applies) or --engine python"
                                  ) from None
        log.info("%s", line)
        return chosen

    def _status(self) -> None:
        s = self.server
        text = statusline.format(
            state="draining" if self.draining else None, served=s.served, in_flight=s.in_flight, errors=s.errors,
            connections=len(s.connections), websockets=s.websockets if isinstance(s, asgi.AsgiServer) else None,
            engine=self.engine, log_dropped=(self.access.dropped or None) if self.access is not None else None)
        if text != self.last_status:
            self.last_status = text
            notify.notify(status=text)
        self.loop.call_later(1.0, self._status)

    def _memory_check(self, statm: int, page: int, first: bool = False) -> None:
        """--max-memory-restart: a callback on the loop, so it runs between requests (never mid-request, unlike
        a supervisor that polls and kills); over the limit the worker drains, exits 0 and systemd starts a
        fresh one, as with --max-requests. MemoryMax= stays the hard limit."""
        if self.draining:
            os.close(statm)
            return
        rss = int(os.pread(statm, 128, 0).split()[1]) * page
        limit = self.cfg.max_memory_restart
        if rss > limit:
            os.close(statm)
            if first:  # a fresh worker already over it would be restarted forever, once a second
                log.error("--max-memory-restart %.1f MiB is below this worker's resident memory right after start "
                          "(%.1f MiB): not recycling by memory (fix: raise it above what a fresh worker uses)",
                          limit / 2**20, rss / 2**20)
                return
            self.drain(f"recycling: resident memory {rss / 2**20:.1f} MiB is over --max-memory-restart "
                       f"{limit / 2**20:.1f} MiB")
            return
        self.loop.call_later(1.0, self._memory_check, statm, page)

    # -- shutdown: signals, recycling, deadline -----------------------------------------------------------
    def on_signal(self, sig: int) -> None:
        if self.draining:
            log.warning("second %s: closing %d connection(s) now", signal.Signals(sig).name,
                        len(self.server.connections))
            self._finish(1)
            return
        self.drain(f"{signal.Signals(sig).name}")

    def recycle(self) -> None:
        if not self.draining:
            self.drain(f"recycling after {self.server.served} requests")

    def drain(self, why: str) -> None:
        self.draining = True
        self.deadline = self.loop.time() + self.cfg.drain_timeout
        s = self.server
        log.info("%s: draining %d in flight, %d connection(s)", why, s.in_flight, len(s.connections))
        notify.notify(stopping=True, status=statusline.format(state="draining", in_flight=s.in_flight, note=why))
        s.begin_drain()
        self._check_drained()

    def _check_drained(self) -> None:
        if self.done.done():
            return
        s = self.server
        if not s.connections and s.in_flight <= 0:
            self._finish(0)
        elif self.loop.time() >= self.deadline:
            log.warning("drain timeout: closing %d connection(s), %d request(s) in flight",
                        len(s.connections), s.in_flight)
            self._finish(1)
        else:
            self.loop.call_later(0.02, self._check_drained)

    def _finish(self, code: int) -> None:
        if code:
            self.server.force_close()
        if not self.done.done():
            self.done.set_result(code)


def _serve(cfg: WorkerConfig, successor: handover.Successor | None) -> int:
    socks = take_sockets(cfg)
    try:
        interface, app = asgi.detect(load_app(cfg.app), cfg.app, cfg.interface)
        runtime = Runtime(cfg, app, socks, interface)
        runtime.successor = successor
        return runtime.run()
    finally:
        for sock in socks:
            sock.close()


def run(cfg: WorkerConfig) -> int:
    """Entry point shared by `python -m clusterctl.worker` and `clusterctl run`."""
    successor = handover.adopt()  # first: a process the reload helper started forks off its launcher here
    # stderr without blocking: a stalled journald must not stop the event loop (see accesslog.py)
    try:
        handler: logging.Handler = LogHandler(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no real fd (embedded, a test runner's stream)
        handler = logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=logging.INFO, handlers=[handler],
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(WxHint())
    if cfg.instance:
        os.environ["CLUSTERCTL_INSTANCE"] = cfg.instance
    os.environ["CLUSTERCTL_NAME"] = cfg.name
    import clusterctl.worker as worker_api  # the module apps import

    worker_api.instance = cfg.instance
    worker_api.name = cfg.name
    bad = options.problem(cfg)
    try:
        if bad:
            raise ClusterctlError(*bad)
        code = _serve(cfg, successor)
    except ClusterctlError as e:
        if successor is not None:  # the reload helper prints it into the journal as the reload's failure
            successor.fail(str(e))
        raise
    if code != 0:
        # Forced exit: request threads may still be stuck in the app, and interpreter shutdown would
        # join them. The deadline is the deadline.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
