"""`python -m clusterctl.worker.reload [--timeout S] -- WORKER COMMAND`: ExecReload= of every worker unit.

`systemctl reload 'NAME@*'` starts one reload job per running instance, all at once; each runs this helper.
The helpers take turns on an flock in the shared RuntimeDirectory, so ONE instance switches at a time
(the lock order is not instance order), and each switch ends only once the new process serves and is the
unit's main process. `systemctl reload` returns after the last one. One switch (see handover.py):
take the old main's sockets, start WORKER COMMAND (the unit's own ExecStart= words, with the unit's
current Environment=: so a reload after `clusterctl install` + daemon-reload picks both up), wait until it
serves, let the old main hand MAINPID over and drain.

Failure: the helper exits 1 with one line naming the reason (the journal shows it with systemd's "Reload
failed"), the new process is ended and the old one serves on; a marker (reload.failed) makes the helpers
queued behind it in the same `systemctl reload` fail at once instead of trying the same release. SIGTERM (a
`systemctl stop` during the reload) ends the new process and exits 0, so the stop leaves nothing failed.
Each job is bounded by the unit's TimeoutStartSec=, the wait for the lock included; --timeout bounds one
switch from the moment this helper holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import time
from typing import Any, NoReturn

from clusterctl.errors import ClusterctlError
from clusterctl.worker import handover

LOCK = "reload.lock"
FAILED = "reload.failed"
COUNTS = "reloads.json"
DEFAULT_TIMEOUT = 60.0


class Helper:
    def __init__(self, timeout: float, worker_argv: list[str]) -> None:
        from clusterctl.worker.options import _parse_plain

        self.timeout = timeout
        self.argv = worker_argv
        self.started_ns = time.time_ns()
        try:
            at = worker_argv.index("clusterctl.worker")
        except ValueError:
            at = -1
        parsed = _parse_plain(worker_argv[at + 1:]) if at > 0 else None
        if not parsed or not parsed.get("instance"):
            raise ClusterctlError(f"ExecReload= names no worker command line with --instance after '--' "
                                  f"({' '.join(worker_argv) or 'nothing'})", "regenerate the units with clusterctl generate")
        self.instance: str = parsed["instance"]
        self.name: str = parsed.get("name", "clusterctl")
        self.unit = f"{self.name}@{self.instance}"
        self.directory = handover.runtime_directory()
        if not self.directory:
            raise ClusterctlError("RUNTIME_DIRECTORY is unset", "run this as ExecReload= of a unit with RuntimeDirectory=")
        main = os.environ.get("MAINPID", "")
        if not main.isdigit() or int(main) <= 1:
            raise ClusterctlError(f"{self.unit} has no main process (MAINPID={main!r}) to replace",
                                  f"start it instead: systemctl start {self.unit}")
        self.main_pid = int(main)
        self.new_pid = 0
        self.new_fd: int | None = None  # pidfd of the new process
        self.serving = False  # the new process accepts connections (end it gently, it may hold requests)
        self.channel: socket.socket | None = None
        self.buf = b""

    # -- the steps ---------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        t0 = time.monotonic()
        lock = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when we exit, however we exit
        waited = time.monotonic() - t0
        self._check_queue()
        deadline = time.monotonic() + self.timeout
        control = self._connect()
        reply, fds = self._ask(control, {"op": "fds"})
        try:
            self._spawn(fds, reply)
        finally:
            for fd in fds:
                os.close(fd)
        self._expect("ready", deadline)
        self.serving = True
        self._ask(control, {"op": "handover", "pid": self.new_pid})
        self._send("main")
        self._expect("ok", time.monotonic() + 10)
        count = self._count()
        print(f"{self.unit}: reloaded in place, pid {self.main_pid} -> {self.new_pid} (serving and main after "
              f"{time.monotonic() - t0 - waited:.2f}s, {waited:.2f}s waiting for the instances before it; "
              f"reload #{count})", flush=True)
        return 0

    def _check_queue(self) -> None:
        """Fail fast when an instance queued before us failed after we started waiting: same release."""
        marker = read_json(self.directory, FAILED)
        if int(marker.get("time_ns", 0)) > self.started_ns:
            raise ReloadFailed(f"not tried: {marker.get('unit', 'another instance')} failed to reload onto the same "
                               f"release moments ago ({marker.get('why', '?')})", "fix the release, then reload again",
                               mark=False)

    def _connect(self) -> socket.socket:
        path = os.path.join(self.directory, handover.control_name(self.instance))
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.settimeout(10)
        try:
            conn.connect(path)
        except OSError as e:
            conn.close()
            raise ReloadFailed(f"cannot reach pid {self.main_pid} on {path} ({e.strerror or e}): it was started by a "
                               "clusterctl without in-place reload, or the unit's user changed",
                               f"restart it once: systemctl restart {self.unit}", mark=False) from e
        pid = int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4], sys.byteorder)
        if pid != self.main_pid:
            conn.close()
            raise ReloadFailed(f"{path} belongs to pid {pid}, not to the main process {self.main_pid}",
                               f"restart the instance: systemctl restart {self.unit}", mark=False)
        return conn

    def _ask(self, conn: socket.socket, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        try:
            conn.send(handover.encode(request))
            reply, fds = handover.recv_reply(conn)
        except (OSError, ValueError) as e:
            raise ReloadFailed(f"pid {self.main_pid} did not answer {request['op']!r}: {e}", "") from e
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise ReloadFailed(f"pid {self.main_pid} refused {request['op']!r}: {reply.get('error')}", "",
                               mark=False)
        return reply, fds

    def _spawn(self, fds: list[int], main: dict[str, Any]) -> None:
        from clusterctl import proc

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = ours
        env = dict(os.environ)
        env.pop("MAINPID", None)
        env.pop("NOTIFY_SOCKET", None)
        env.update({handover.ENV_CHANNEL: str(theirs.fileno()), handover.ENV_FDS: " ".join(map(str, fds)),
                    handover.ENV_PREDECESSOR: str(self.main_pid), handover.ENV_NOTIFY: str(main.get("notify_socket", ""))})
        if main.get("watchdog_usec"):
            env["WATCHDOG_USEC"] = str(main["watchdog_usec"])
        try:
            code = proc.launch(self.argv, env=env, pass_fds=[*fds, theirs.fileno()])
        finally:
            theirs.close()
        line = self._line(time.monotonic() + 5)
        if code != 0 or not line.startswith("pid "):
            raise ReloadFailed(f"the new process did not start ({' '.join(self.argv[:3])} exited {code}"
                               + (f": {line}" if line else "") + ")", "check ExecStart= (clusterctl generate --python)")
        self.new_pid = int(line.split()[1])
        self.new_fd = handover.pidfd(self.new_pid)

    def _expect(self, word: str, deadline: float) -> None:
        line = self._line(deadline)
        if line == word:
            return
        if line.startswith("failed "):
            why = line.removeprefix("failed ")
        elif line == "timeout":
            why = f"not {word} within {self.timeout:g}s (still importing, or --ready-path never answered 2xx)"
        else:
            why = "it exited (its lines above say why)"
        raise ReloadFailed(f"the new process (pid {self.new_pid}) failed: {why}", "fix the release, then reload again")

    def _line(self, deadline: float) -> str:
        """The next line the new process (or its launcher) sent; "" at EOF, "timeout" at the deadline."""
        assert self.channel is not None
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.channel], [], [], left)[0]:
                return "timeout"
            chunk = self.channel.recv(4096)
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")

    def _send(self, word: str) -> None:
        assert self.channel is not None
        with contextlib.suppress(OSError):
            self.channel.sendall(word.encode() + b"\n")

    # -- endings ------------------------------------------------------------------------------------------
    def end_new(self) -> None:
        """End the new process: once it serves, closing the channel makes it drain what it took; before,
        it may be stuck in the app's import, so SIGKILL."""
        if self.new_fd is not None and not self.serving:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.new_fd, signal.SIGKILL)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def mark_failed(self, why: str) -> None:
        write_json(self.directory, FAILED, {"time_ns": time.time_ns(), "unit": self.unit, "why": why})

    def _count(self) -> int:
        """Count this reload in reloads.json (under the lock, so no two helpers write at once)."""
        counts = read_json(self.directory, COUNTS)
        mine = counts.get(self.instance) if isinstance(counts.get(self.instance), dict) else {}
        count = int(mine.get("count", 0)) + 1
        counts[self.instance] = {"count": count, "last": time.time(), "pid": self.new_pid}
        write_json(self.directory, COUNTS, counts)
        return count

    def _on_sigterm(self, signum: int, frame: Any) -> NoReturn:
        # A stop (or a restart) during the reload: the stop wins, and exiting 0 leaves the unit unfailed.
        self.end_new()
        print(f"{self.unit}: reload abandoned: the unit is stopping", file=sys.stderr, flush=True)
        os._exit(0)


class ReloadFailed(ClusterctlError):
    exit_code = 1

    def __init__(self, message: str, fix: str | None = None, *, mark: bool = True) -> None:
        super().__init__(message, fix or None)
        self.mark = mark


def read_json(directory: str, name: str) -> dict[str, Any]:
    """A small JSON object in the runtime directory, {} when missing or unreadable."""
    import json

    try:
        with open(os.path.join(directory, name), "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(directory: str, name: str, value: dict[str, Any]) -> None:
    """Replace a small JSON file in the runtime directory atomically (tmp + rename)."""
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        with open(tmp, "wb", opener=lambda p, fl: os.open(p, fl, 0o600)) as f:
            f.write(handover.encode(value))
        os.rename(tmp, os.path.join(directory, name))


def parse(argv: list[str]) -> tuple[float, list[str]]:
    timeout = DEFAULT_TIMEOUT
    if "--" not in argv:
        raise ClusterctlError("no worker command line after '--'", "regenerate the units with clusterctl generate")
    own, worker = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    while own:
        flag = own.pop(0)
        if flag == "--timeout" and own:
            try:
                timeout = float(own.pop(0))
            except ValueError:
                timeout = -1
            if not 0 < timeout < 86400:
                raise ClusterctlError("--timeout must be a number of seconds above 0", "e.g. --timeout 60")
        else:
            raise ClusterctlError(f"unknown option {flag!r}",
                                  "usage: python -m clusterctl.worker.reload [--timeout S] -- WORKER ARGV")
    return timeout, worker


def main(argv: list[str] | None = None) -> int:
    helper: Helper | None = None
    try:
        timeout, worker = parse(sys.argv[1:] if argv is None else argv)
        helper = Helper(timeout, worker)
        return helper.run()
    except ClusterctlError as e:
        who = helper.unit if helper is not None else "clusterctl reload"
        if helper is not None:
            helper.end_new()
            if getattr(e, "mark", True):
                helper.mark_failed(e.message)
        serving = f"; pid {helper.main_pid} serves on" if helper is not None else ""
        fix = f" (fix: {e.fix})" if e.fix else ""
        print(f"{who}: reload failed: {e.message}{serving}{fix}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
