"""A worker's message inbox: the worker side of clusterctl.messaging.

One Unix datagram socket per worker in the unit's runtime directory, read on the event loop. A broadcast
updates `clusterctl.worker.state` (merged, swapped in one assignment) and every message goes to the app's
`on_message` handlers. Stays cheap to import: stdlib and the wire format only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from typing import Any

import clusterctl.worker as api
from clusterctl.messaging import ENVELOPE, MAX_MESSAGE, bind_placed, decode, load_state, socket_name, unlink_placed

log = logging.getLogger("clusterctl.messaging")

class Inbox:
    """A worker's datagram socket, read on the event loop; updates `clusterctl.worker.state` and calls
    the app's `on_message` handlers. Never raises into the loop: a bad message is logged and dropped."""

    def __init__(self, directory: str | os.PathLike[str], instance: str, staged: bool = False) -> None:
        self.api = api
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, socket_name(instance))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # In-place reload: a new process binds a hidden name until it takes over (see `publish`).
            self.bound, self.ino = bind_placed(self.sock, self.path, staged)
        except OSError:
            self.sock.close()
            raise
        self.loop: Any = None
        self.tasks: set[asyncio.Future[Any]] = set()  # running async handlers (strong references)
        self.handed_over = False  # an in-place reload replaced this process (see unlink_placed)

    @classmethod
    def start(cls, loop: Any, instance: str, staged: bool = False) -> Inbox | None:
        """Bind, load the saved state, and read on `loop`; call before READY=1. None (messaging off) outside
        a unit with RuntimeDirectory= (e.g. `clusterctl run`), or when the socket cannot be bound."""
        directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if not directory or not instance:
            return None
        try:
            inbox = cls(directory, instance, staged)
        except OSError as e:
            log.warning("messaging off: cannot bind %s: %s", os.path.join(directory, socket_name(instance)), e)
            return None
        inbox.attach(loop)  # nothing is read before the loop runs; async handlers of the saved state need it
        state = load_state(directory)
        if state:
            inbox.api._set_state(state)
            inbox._dispatch(state)  # handlers see the saved state once, as if it were one broadcast
        return inbox

    def publish(self) -> None:
        """In-place reload, once this process is main: rename the staged socket over the predecessor's, then
        read state.json again. A broadcast sends after saving, so one sent before the rename is in the file
        and one sent after it reaches us: none is missed. Keys that changed meanwhile go to the handlers."""
        if self.bound == self.path:
            return
        os.rename(self.bound, self.path)
        self.bound = self.path
        old = self.api.state.snapshot()
        state = load_state(self.directory)
        changed = {k: v for k, v in state.items() if k not in old or old[k] != v}
        if changed:
            self.api._set_state({**old, **changed})
            self._dispatch(changed)

    def attach(self, loop: Any) -> None:
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded: a flood must not starve the requests
            try:
                datagram = self.sock.recv(MAX_MESSAGE + ENVELOPE + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("message socket: %s", e)
                return
            self.handle(datagram)

    def handle(self, datagram: bytes) -> None:
        try:
            kind, message = decode(datagram)
        except ValueError as e:
            log.warning("dropped a bad message (%d bytes): %s", len(datagram), e)
            return
        if kind == "broadcast":
            self.api._set_state({**self.api.state.snapshot(), **message})
        self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        for handler in list(self.api._handlers):
            try:
                result = handler(message)
                if hasattr(result, "__await__"):  # an `async def` handler (ASGI apps): a task on the loop
                    task = asyncio.ensure_future(result, loop=self.loop)
                    self.tasks.add(task)
                    task.add_done_callback(functools.partial(self._task_done, handler))
            except Exception:
                self._handler_failed(handler)

    def _task_done(self, handler: Any, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._handler_failed(handler, task.exception())

    @staticmethod
    def _handler_failed(handler: Any, exc: BaseException | bool | None = True) -> None:
        log.error("message handler %s raised; the message is dropped for it", getattr(handler, "__qualname__", handler),
                  exc_info=exc)

    def close(self) -> None:
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if not self.handed_over:
            unlink_placed(self.bound, self.ino)
