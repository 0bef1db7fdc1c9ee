"""Log lines that never hold up serving: the access log (journald's native socket, or stdout) and the
worker's own log records (stderr, `LogHandler`).

A worker logs one line per request from its event loop. If whatever reads the log stops reading
(journald stalled, blocked on a slow disk, stopped, or being restarted), a blocking write would stop the
event loop with it: no request served, no WATCHDOG=1, and systemd kills the worker. So every write here
is non-blocking: a line that cannot be handed over at once is dropped and counted, and once the reader
takes lines again the worker logs how many it dropped. A full disk is not such a case: journald keeps
reading and drops the lines itself ("Failed to write entry ... ignoring").

* journal (the default under systemd): one datagram per line to /run/systemd/journal/socket in journald's
  native format, with MSG_DONTWAIT (python-systemd's `journal.send` blocks when journald's queue is full).
* stream (`--no-journal`, or outside systemd): lines batched per loop turn, written to fd 1 only while
  poll() says it is writable, in chunks of at most PIPE_BUF; up to MAX_PENDING bytes wait for the next try.
* log records (`LogHandler`, installed by the runtime on stderr, which systemd connects to journald's stream
  socket): written the same way, or dropped and counted; they are rare, except when an app fails on every
  request while journald stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any

log = logging.getLogger("clusterctl.worker")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_PENDING = 256 * 1024  # stream: bytes kept for a reader that is briefly slow; beyond it lines are dropped
CHUNK = select.PIPE_BUF  # a pipe with room for one more buffer takes this much without blocking
RETRY = 0.05  # stream: seconds between tries while lines are pending


def journal_field(key: str, value: str) -> bytes:
    """One field in journald's native protocol (the binary-safe form when the value has a newline)."""
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def dropped_notice(n: int, reader: str) -> str:
    return (f"access log: dropped {n} line(s): {reader} did not take them at once (not reading: stalled, "
            "stopped or restarting); requests were served meanwhile")


def write_now(fd: int, poller: select.poll, data: bytes) -> int:
    """Write as much of `data` as `fd` takes without waiting (poll before each chunk of at most CHUNK bytes);
    returns the bytes written. OSError when the reader is gone (EPIPE, POLLHUP, ...)."""
    done = 0
    while done < len(data):
        try:
            ready = poller.poll(0)
        except InterruptedError:
            break
        if not any(ev & select.POLLOUT for _fd, ev in ready):
            if any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _fd, ev in ready):
                raise BrokenPipeError(f"fd {fd}: the reader is gone")
            break
        try:
            done += os.write(fd, data[done:done + CHUNK])
        except (BlockingIOError, InterruptedError):
            break
    return done


class LogHandler(logging.Handler):
    """The worker's own log lines (stderr, which systemd connects to journald) without ever blocking: a record
    that cannot be written whole at once is dropped (a partial one is ended with a newline when possible), and
    the count is logged before the next record that gets through."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self.poll = select.poll()
        self.poll.register(fd, select.POLLOUT)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        with contextlib.suppress(OSError):
            if self.dropped:
                notice = f"WARNING clusterctl.worker: dropped {self.dropped} log record(s): nobody read stderr at once\n"
                if write_now(self.fd, self.poll, notice.encode()) < len(notice):
                    self.dropped += 1
                    return
                self.dropped = 0
            n = write_now(self.fd, self.poll, data)
            if n == len(data):
                return
            if n:
                write_now(self.fd, self.poll, b"\n")
        self.dropped += 1


class JournalSink:
    """Datagrams to journald's native socket without ever blocking."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def send(self, datagram: bytes) -> bool:
        """True when journald got it; False when its queue is full or it is gone (the caller counts a drop)."""
        try:
            self.sock.send(datagram, socket.MSG_DONTWAIT)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except (ConnectionRefusedError, FileNotFoundError):
            # the socket was recreated (systemd-journald.socket restarted): connect again, once
            with contextlib.suppress(OSError):
                self.sock.connect(self.path)
                self.sock.send(datagram, socket.MSG_DONTWAIT)
                return True
            return False
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


class AccessLog:
    """Called by the engine once per response: `access(proto, status, nbytes)`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: Any, journal: bool, *,
                 journal_path: str = JOURNAL_SOCKET, stream_fd: int = 1) -> None:
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.instance = cfg.instance
        self.name = cfg.name
        self.dropped = 0  # lines dropped since start (shown in STATUS=)
        self.unreported = 0  # dropped lines not yet followed by a notice in the log itself
        self.journal: JournalSink | None = None
        if journal:
            try:
                self.journal = JournalSink(journal_path)
            except OSError as e:
                log.warning("access log: cannot reach journald at %s (%s); writing to stdout", journal_path, e)
        if self.journal is not None:
            self.fixed = (journal_field("CLUSTERCTL_NAME", self.name) + journal_field("INSTANCE", self.instance)
                          + journal_field("SYSLOG_IDENTIFIER", f"{self.name}@{self.instance}"))
        self.fd = stream_fd
        self.poll = select.poll()
        self.poll.register(stream_fd, select.POLLOUT)
        self.buf: list[str] = []
        self.pending = b""
        self.scheduled = False
        self.retrying = False

    def __call__(self, proto: Any, status: int, nbytes: int) -> None:
        ms = (time.perf_counter() - proto.t0) * 1000.0
        line = f'{proto.client_addr() or "-"} "{proto.req_line}" {status} {nbytes} {ms:.1f}ms'
        if self.journal is not None:
            method, _, rest = proto.req_line.partition(" ")
            entry = (journal_field("MESSAGE", line) + b"PRIORITY=6\n" + journal_field("METHOD", method)
                     + journal_field("PATH", rest.rpartition(" ")[0]) + b"STATUS=%d\nDURATION_MS=%.3f\nBYTES=%d\n"
                     % (status, ms, nbytes) + self.fixed)
            if self.unreported:
                self._notice_journal()  # first, so the gap shows where it is
            if not self.journal.send(entry):
                self._drop(1)
            return
        self.buf.append(line + "\n")
        if not self.scheduled:
            self.scheduled = True
            if threading.get_ident() == self.loop_thread:
                self.loop.call_soon(self.flush)
            else:  # a request thread (--threads)
                self.loop.call_soon_threadsafe(self.flush)

    def _drop(self, lines: int) -> None:
        self.dropped += lines
        self.unreported += lines

    def _notice_journal(self) -> None:
        assert self.journal is not None
        n = self.unreported
        if self.journal.send(journal_field("MESSAGE", dropped_notice(n, "journald")) + b"PRIORITY=4\n" + self.fixed):
            self.unreported -= n

    # -- stream --------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand what is buffered to fd 1 as far as it takes it now; keep or drop the rest, never wait."""
        self.scheduled = False
        if self.buf:
            lines, self.buf = self.buf, []
            data = "".join(lines).encode("utf-8", "replace")
            if len(self.pending) + len(data) > MAX_PENDING:
                self._drop(len(lines))
            else:
                self.pending += data
        self._write()
        if self.pending and not self.retrying:
            self.retrying = True
            self.loop.call_later(RETRY, self._retry)

    def _retry(self) -> None:
        self.retrying = False
        self.flush()

    def _write(self) -> None:
        while True:
            if not self.pending:
                if not self.unreported:
                    return
                self.pending = (dropped_notice(self.unreported, "the log reader") + "\n").encode()
                self.unreported = 0
            try:
                n = write_now(self.fd, self.poll, self.pending)
            except OSError:  # EPIPE (the reader is gone), EIO, ...: what is pending is lost
                self._lose_pending()
                return
            self.pending = self.pending[n:]
            if self.pending:
                return

    def _lose_pending(self) -> None:
        lines = self.pending.count(b"\n")
        self.pending = b""
        if lines:
            self.dropped += lines  # not reported again: nothing reads this stream any more

    def close(self) -> None:
        """At exit: one last non-blocking try for the stream, then let go of journald's socket."""
        if self.journal is None:
            self.flush()
        else:
            self.journal.close()
