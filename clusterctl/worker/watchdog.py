"""Request timeout and systemd watchdog: one small thread that watches the event loop from outside.

A WSGI app runs on the loop's thread (engine.py), so a long request stops the loop, and a watchdog fed from
the loop would have systemd SIGABRT the worker for a report export that takes 12 s, without saying which
request it was. This thread keeps the two apart:

* `--timeout` (gunicorn's name and default, 30 s) bounds one stretch of app code: a request (or one chunk of a
  streamed response, or a request on a --threads thread) that runs longer gets one journal line naming it
  (method, target, how long, instance) and the stack it is stuck in, and the worker exits 1 so systemd's
  Restart= replaces it, as gunicorn's arbiter replaces a silent worker.
* `WATCHDOG=1` is sent while the loop turns, or while it is blocked by app code still within --timeout. A loop
  blocked anywhere else (our code, an ASGI app calling blocking code, a deadlock) stops the pings, and
  systemd's WatchdogSec= restarts the worker; so does a process where this thread cannot run at all (C code
  holding the GIL for longer than WatchdogSec=).

The loop is watched through counters it bumps anyway (`Server.beats` per housekeeping tick, `app_steps` per
streamed chunk) and the request in `app_req`, never a clock read per request.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

from clusterctl.worker import notify

log = logging.getLogger("clusterctl.worker")

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # clusterctl/
TIMEOUT_EXIT = 1  # Restart=on-failure brings a fresh worker; the journal line says why


def describe(req: Any) -> str:
    """`METHOD target` of an http.request.Request (the compiled lane sets a (method, target) pair), for the
    journal."""
    try:
        method, target = (req.method, req.target) if hasattr(req, "target") else req[:2]
        return f"{method.decode('latin-1')} {target.decode('latin-1')}"
    except Exception:
        return "a request"


class Monitor:
    """The thread; `start()` once the worker serves, `stop()` when it exits."""

    def __init__(self, server: Any, *, timeout: float, watchdog: float | None, instance: str = "") -> None:
        self.server = server
        self.timeout = timeout
        self.watchdog = watchdog  # seconds between pings (half of WatchdogSec=), None without a watchdog
        self.instance = instance
        self.loop_thread = threading.get_ident()  # made on the loop's thread
        self.period = min(0.5, watchdog / 2) if watchdog else 0.5
        # A loop that has not ticked for this long is blocked (it ticks every tick_interval when healthy).
        self.stuck_after = 2 * float(getattr(server, "tick_interval", 1.0)) + self.period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clusterctl-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        server = self.server
        now = time.monotonic()
        beats, beat_seen = server.beats, now
        last_req: Any = None
        steps, step_seen = -1, now
        last_ping = 0.0
        warned = False
        while not self._stop.wait(self.period):
            now = time.monotonic()
            if server.beats != beats:
                beats, beat_seen = server.beats, now
                warned = False
            req = server.app_req
            # A new app call (another request tuple) or a streamed response's next chunk: its clock starts now.
            if req is None or req is not last_req or server.app_steps != steps:
                last_req, steps, step_seen = req, server.app_steps, now
            in_app = now - step_seen if req is not None else 0.0
            if req is not None and in_app >= self.timeout:
                self._timed_out(req, in_app, self.loop_thread)
                return
            for ident, (treq, started) in self._threads():
                if now - started >= self.timeout:
                    self._timed_out(treq, now - started, ident)
                    return
            quiet = now - beat_seen
            stuck = quiet >= self.stuck_after and req is None
            if stuck and not warned:
                warned = True
                log.error("the event loop has not run for %.1f s and no request's app code is running: %s", quiet,
                          "stopping WATCHDOG=1, so systemd's WatchdogSec= restarts this worker"
                          if self.watchdog else "without a systemd watchdog nothing restarts it")
            if self.watchdog and not stuck and now - last_ping >= self.watchdog:
                notify.notify(watchdog=True)
                last_ping = now

    def _threads(self) -> list[tuple[int, tuple[Any, float]]]:
        try:
            return list(self.server.running.items())
        except RuntimeError:  # changed while copied: look again next period
            return []

    def _timed_out(self, req: Any, seconds: float, thread: int) -> None:
        where = f" on instance {self.instance}" if self.instance else ""
        what = describe(req)
        log.error("request timeout: %s has run %.1f s, over --timeout %g s%s; replacing this worker (pid %d)",
                  what, seconds, self.timeout, where, os.getpid())
        frame = sys._current_frames().get(thread)
        if frame is not None:
            frames = traceback.extract_stack(frame)
            ours = [i for i, f in enumerate(frames) if f.filename.startswith(_PACKAGE)]
            app_frames = frames[ours[-1] + 1:] if ours and ours[-1] + 1 < len(frames) else frames  # the app's own
            log.error("request timeout: %s was here:\n%s", what, "".join(traceback.format_list(app_frames)).rstrip())
        notify.notify(status=f"request timeout: {what} ran {seconds:.1f} s (--timeout {self.timeout:g}); exiting")
        os._exit(TIMEOUT_EXIT)
