"""In-place reload, the worker's side: hand one instance's place to a fresh process without a restart.

`systemctl reload NAME@I` runs `python -m clusterctl.worker.reload` (ExecReload=, see reload.py),
which drives both processes through what is defined here:

    helper -> old main, control socket:  "fds"       -> the listening sockets (SCM_RIGHTS), NOTIFY_SOCKET and
              WATCHDOG_USEC (systemd sets those for the main process only)
    helper -> launcher (fresh interpreter, the unit's current ExecStart= words and Environment=)
              launcher forks the new process and exits at once: the new process is re-parented to
              systemd before it runs, so systemd supervises it like any main process (a child of the
              old one would be SIGKILLed at the next stop)
    new    -> helper, channel:   "pid N" (from the launcher), then "ready" once it serves
    helper -> old main:          "handover N" -> MAINPID=N + READY=1 (only the main PID may notify, so
              the old one says it), then the old process stops notifying and drains
    helper -> new, channel:      "main" -> it notifies from now on, moves the messaging and control
              sockets into place (renamed over the old ones) and answers "ok"

A new process never notifies before it is main ("reception only permitted for main PID"): NOTIFY_SOCKET
is kept out of its environment until "main". If the helper goes away first (its job timed out, the unit
is stopping), the new process exits (or drains, once it serves) and the old one never noticed anything.
On SIGTERM the new main waits for its predecessor (pidfd) before exiting: with KillMode=mixed, systemd
SIGKILLs whatever is left in the cgroup once the main process is gone, a predecessor still draining too.

Worker processes import this module: stdlib only, json imported on use.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, Protocol

from clusterctl.messaging import bind_placed, unlink_placed

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("clusterctl.worker")

ENV_CHANNEL = "CLUSTERCTL_RELOAD_CHANNEL"
ENV_FDS = "CLUSTERCTL_RELOAD_FDS"
ENV_PREDECESSOR = "CLUSTERCTL_RELOAD_PREDECESSOR"
ENV_NOTIFY = "CLUSTERCTL_RELOAD_NOTIFY_SOCKET"
ENV_LAUNCHER = "CLUSTERCTL_RELOAD_LAUNCHER"
MAX_FDS = 64


class Runtime(Protocol):
    """What the hand-over reads and calls on the worker's runtime (runtime.Runtime), named here instead of
    imported: the runtime imports this module, not the other way round."""

    loop: asyncio.AbstractEventLoop
    socks: list[socket.socket]
    draining: bool
    notifying: bool
    inbox: Any  # inbox.Inbox | None: publish(), handed_over
    control: Control | None

    def drain(self, why: str) -> None: ...


def control_name(instance: str) -> str:
    return f"control-{instance}.sock"


def runtime_directory() -> str:
    return os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]


def encode(message: dict[str, Any]) -> bytes:
    import json

    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    import json

    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def pidfd(pid: int) -> int | None:
    """A pidfd for `pid` (signals and waits that cannot hit a recycled pid), None if it is gone."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


# --- the old main: the control socket ------------------------------------------------------------------

class Control:
    """A worker's control socket (/run/NAME/control-I.sock, SOCK_SEQPACKET, mode 0600) read on its event loop:
    gives the listening sockets to the reload helper and, on its word, hands MAINPID over and drains."""

    def __init__(self, runtime: Runtime, directory: str, instance: str, staged: bool) -> None:
        self.runtime = runtime
        self.loop: asyncio.AbstractEventLoop = runtime.loop
        self.path = os.path.join(directory, control_name(instance))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self.bound, self.ino = bind_placed(self.sock, self.path, staged)
            self.sock.listen(4)
        except OSError:
            self.sock.close()
            raise
        # Our own copies: the event loop's servers close theirs when the drain begins.
        self.fds = [os.dup(s.fileno()) for s in runtime.socks]
        self.conns: set[socket.socket] = set()
        self.handed_over = False  # a successor took over: its sockets now sit at our paths
        self.loop.add_reader(self.sock.fileno(), self._accept)

    @classmethod
    def start(cls, runtime: Runtime, instance: str, staged: bool = False) -> Control | None:
        """None outside a unit with RuntimeDirectory= (`clusterctl run`): such a worker cannot be reloaded."""
        directory = runtime_directory()
        if not directory or not instance:
            return None
        try:
            return cls(runtime, directory, instance, staged)
        except OSError as e:
            log.warning("in-place reload off: cannot bind %s: %s", os.path.join(directory, control_name(instance)), e)
            return None

    def publish(self) -> None:
        """Move a staged socket into place (an atomic rename over the predecessor's)."""
        if self.bound != self.path:
            os.rename(self.bound, self.path)
            self.bound = self.path

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            if not isinstance(e, (BlockingIOError, InterruptedError)):
                log.warning("control socket: %s", e)
            return
        conn.setblocking(False)
        self.conns.add(conn)
        self.loop.add_reader(conn.fileno(), self._on_request, conn)

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(conn.fileno())
        self.conns.discard(conn)
        conn.close()

    def _on_request(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        try:
            request = decode(data)
            reply, fds = self.answer(request)
        except ValueError as e:
            reply, fds = {"ok": False, "error": f"bad request: {e}"}, []
        try:
            socket.send_fds(conn, [encode(reply)], fds)
        except OSError as e:
            log.warning("control socket: cannot answer: %s", e)
            self._drop(conn)
            return
        if reply.get("ok") and request.get("op") == "handover":
            self.handed_over = True
            if self.runtime.inbox is not None:
                self.runtime.inbox.handed_over = True
            self.runtime.drain(f"reloaded: pid {request['pid']} took over")

    def answer(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The reply to one request, and the fds to pass with it."""
        rt = self.runtime
        if rt.draining:
            return {"ok": False, "error": f"pid {os.getpid()} is draining (stopping or recycling)"}, []
        op = request.get("op")
        if op == "fds":
            # systemd gives these to the main process only, not to the helper (ExecReload=)
            return {"ok": True, "pid": os.getpid(), "notify_socket": os.environ.get("NOTIFY_SOCKET", ""),
                    "watchdog_usec": os.environ.get("WATCHDOG_USEC", "")}, self.fds
        if op == "handover" and isinstance(request.get("pid"), int) and request["pid"] > 1:
            from systemd import daemon

            if not os.environ.get("NOTIFY_SOCKET") or not daemon.notify(f"MAINPID={request['pid']}\nREADY=1"):
                return {"ok": False, "error": "cannot notify systemd (NOTIFY_SOCKET unset?)"}, []
            # From here on we are not the main process: anything we would send is refused, and a STOPPING=1
            # would stop the unit. The drain that follows is silent.
            os.environ.pop("NOTIFY_SOCKET", None)
            rt.notifying = False
            return {"ok": True}, []
        return {"ok": False, "error": f"unknown request {request!r}"}, []

    def close(self) -> None:
        for conn in list(self.conns):
            self._drop(conn)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if not self.handed_over:
            unlink_placed(self.bound, self.ino)


# --- the new process ----------------------------------------------------------------------------------

class Successor:
    """The new process's half of a hand-over: its channel to the helper and its predecessor's pidfd."""

    def __init__(self, channel: int, predecessor: int, notify_socket: str) -> None:
        self.channel = channel
        self.predecessor = predecessor
        self.pidfd = pidfd(predecessor)
        self.notify_socket = notify_socket
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runtime: Runtime | None = None
        self.main: asyncio.Future[bool] | None = None
        self.is_main = False
        threading.Thread(target=self._read, name="clusterctl-reload", daemon=True).start()

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.channel, (line.replace("\n", " ") + "\n").encode())

    def fail(self, why: str) -> None:
        """Tell the helper why this process will not become ready (it prints it into the journal)."""
        self.send(f"failed {why}")

    def _read(self) -> None:
        """The helper's words, read on a thread: it must also notice the helper's end while the app imports."""
        buf = b""
        while True:
            try:
                chunk = os.read(self.channel, 256)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            if b"main\n" in buf:
                loop = self.loop
                if loop is not None:
                    loop.call_soon_threadsafe(self._resolve, True)
                return
        if self.loop is None:
            # still importing or starting: nothing served yet, nobody waits for us
            log.warning("reload helper went away before the hand-over: exiting")
            os._exit(1)
        self.loop.call_soon_threadsafe(self._resolve, False)

    def _resolve(self, main: bool) -> None:
        if self.main is not None and not self.main.done():
            self.main.set_result(main)
        elif not main and not self.is_main and self.runtime is not None and not self.runtime.draining:
            self.runtime.drain("reload abandoned by its helper")

    def attach(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loop = runtime.loop
        self.main = runtime.loop.create_future()

    async def take_over(self) -> bool:
        """Say "ready", wait for "main", then notify and own the sockets. False: the reload was abandoned."""
        assert self.runtime is not None and self.main is not None and self.loop is not None
        import asyncio

        rt = self.runtime
        launcher = int(os.environ.pop(ENV_LAUNCHER, "0") or 0)
        while os.getppid() == launcher:  # re-parented to systemd before MAINPID points here (a few ms at most)
            await asyncio.sleep(0.005)
        self.send("ready")
        if not await self.main or rt.draining:
            if not rt.draining:
                rt.drain("reload abandoned by its helper")
            return False
        self.is_main = True
        os.environ["NOTIFY_SOCKET"] = self.notify_socket
        for owner in (rt.inbox, rt.control):
            if owner is not None:
                try:
                    owner.publish()
                except OSError as e:
                    log.warning("cannot move %s into place: %s", getattr(owner, "path", owner), e)
        self.send("ok")
        os.close(self.channel)
        return True

    async def wait_predecessor(self, timeout: float) -> None:
        """Before this main process exits: wait (bounded) until the one it replaced has finished draining."""
        if self.pidfd is None or self.loop is None:
            return
        import asyncio

        done = self.loop.create_future()
        self.loop.add_reader(self.pidfd, lambda: done.done() or done.set_result(None))
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            log.warning("pid %d (replaced by this process) is still draining after %.0fs", self.predecessor, timeout)
        finally:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


def adopt() -> Successor | None:
    """In a process started by the reload helper (it set CLUSTERCTL_RELOAD_CHANNEL): fork, let the launcher
    exit (re-parenting the new process to systemd), and put the listening sockets where sd_listen_fds looks.
    None in a process systemd started itself. Call first, while the process is single-threaded."""
    spec = os.environ.pop(ENV_CHANNEL, None)
    if spec is None:
        return None
    channel = int(spec)
    launcher = os.getpid()
    child = os.fork()
    if child:
        with contextlib.suppress(OSError):
            os.write(channel, f"pid {child}\n".encode())
        os._exit(0)
    os.environ[ENV_LAUNCHER] = str(launcher)
    fds = [int(x) for x in os.environ.pop(ENV_FDS, "").split()]
    # Move the sockets to 3, 4, ... (SD_LISTEN_FDS_START) by way of high numbers, so none is overwritten.
    channel = _move_high(channel)
    high = [_move_high(fd) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(high)), LISTEN_PID=str(os.getpid()))
    if os.environ.get("WATCHDOG_USEC"):
        os.environ["WATCHDOG_PID"] = str(os.getpid())
    predecessor = int(os.environ.pop(ENV_PREDECESSOR, "0") or 0)
    return Successor(channel, predecessor, os.environ.pop(ENV_NOTIFY, ""))


def _move_high(fd: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + MAX_FDS + 1)
    os.close(fd)
    return new


def recv_reply(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One control-socket reply and the fds that came with it (the helper's side)."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 4096, MAX_FDS)
    if not data:
        raise ConnectionResetError("the worker closed its control socket")
    return decode(data), list(fds)

