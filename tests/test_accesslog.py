"""The access log never holds up the event loop: a reader that stops reading (journald stalled) costs log
lines, counted and reported once it reads again, never a blocked worker.

Each test runs the logging in a thread with a deadline: with a blocking write (python-systemd's
`journal.send`, or `sys.stdout.write`) it would hang there, and the test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from clusterctl.worker.accesslog import AccessLog, journal_field

CFG = SimpleNamespace(instance="3", name="web")


def proto(path: str = "/x") -> SimpleNamespace:
    return SimpleNamespace(t0=time.perf_counter(), client_addr=lambda: "127.0.0.1",
                           req_line=f"GET {path} HTTP/1.1")


def within(seconds: float, fn: Callable[[], None]) -> None:
    """Run fn in a thread; fail if it is still running after `seconds` (it blocked)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the access log blocked for more than {seconds}s on a reader that does not read"
    if errors:
        raise errors[0]


def parse_native(datagram: bytes) -> dict[str, str]:
    fields, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        head = datagram[i:nl]
        if b"=" in head:
            k, _, v = head.partition(b"=")
            fields[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", datagram[nl + 1:nl + 9])
            fields[head.decode()] = datagram[nl + 9:nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return fields


def test_journal_field_native_format() -> None:
    assert journal_field("A", "b c") == b"A=b c\n"
    assert parse_native(journal_field("M", "two\nlines") + b"X=1\n") == {"M": "two\nlines", "X": "1"}


def test_journal_stalled_drops_and_counts_then_reports(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.socket")
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(path)  # a journald that does not read: its queue fills up
    loop = asyncio.new_event_loop()
    try:
        alog = AccessLog(loop, CFG, journal=True, journal_path=path)
        assert alog.journal is not None
        within(10, lambda: [alog(proto(f"/{i}"), 200, 5) for i in range(5000)])
        assert alog.dropped > 0, "5000 datagrams fit in an unread queue? (raise the count)"
        journald.setblocking(False)
        got = []
        while True:
            try:
                got.append(parse_native(journald.recv(65536)))
            except BlockingIOError:
                break
        assert len(got) + alog.dropped == 5000
        first = got[0]
        assert first["MESSAGE"].startswith('127.0.0.1 "GET /0 HTTP/1.1" 200 5 ')
        assert (first["METHOD"], first["PATH"], first["STATUS"], first["BYTES"], first["INSTANCE"],
                first["SYSLOG_IDENTIFIER"], first["CLUSTERCTL_NAME"]) == ("GET", "/0", "200", "5", "3", "web@3", "web")
        # journald reads again: the next line is preceded by the count of what was lost, as a warning
        dropped = alog.dropped
        alog(proto("/after"), 200, 5)
        notice, after = parse_native(journald.recv(65536)), parse_native(journald.recv(65536))
        assert notice["PRIORITY"] == "4" and f"dropped {dropped} line(s)" in notice["MESSAGE"], notice
        assert '"GET /after HTTP/1.1"' in after["MESSAGE"] and alog.unreported == 0
    finally:
        loop.close()
        journald.close()


def test_journal_missing_falls_back_to_stdout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        alog = AccessLog(loop, CFG, journal=True, journal_path=str(tmp_path / "nothing"))
    finally:
        loop.close()
    assert alog.journal is None
    assert "cannot reach journald" in caplog.text


def test_stream_stalled_drops_and_counts_then_reports() -> None:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)  # what journald's stdout stream is
    loop = asyncio.new_event_loop()
    try:
        alog = AccessLog(loop, CFG, journal=False, stream_fd=writer.fileno())

        def log_a_lot() -> None:
            for i in range(200):
                for j in range(100):
                    alog(proto(f"/{i}-{j}"), 200, 5)
                loop.run_until_complete(asyncio.sleep(0))  # one loop turn: flush

        within(20, log_a_lot)
        assert alog.dropped > 0, "20000 lines fit in an unread socket? (raise the count)"
        reader.setblocking(False)
        got = b""
        while True:
            try:
                got += reader.recv(1 << 20)
            except BlockingIOError:
                if not alog.pending:
                    break
                loop.run_until_complete(asyncio.sleep(0.06))  # the retry timer writes what was kept
        lines = got.decode().splitlines()
        notices = [ln for ln in lines if ln.startswith("access log: dropped ")]
        assert notices == [f"access log: dropped {alog.dropped} line(s): the log reader did not take them at once"
                           " (not reading: stalled, stopped or restarting); requests were served meanwhile"], notices
        assert len(lines) - 1 + alog.dropped == 20000
        assert all(ln.startswith('127.0.0.1 "GET /') for ln in lines if ln not in notices)  # whole lines only
        assert alog.unreported == 0
        alog(proto("/after"), 200, 5)
        loop.run_until_complete(asyncio.sleep(0))
        assert reader.recv(1 << 20).decode().startswith('127.0.0.1 "GET /after HTTP/1.1"')
    finally:
        loop.close()
        reader.close()
        writer.close()


def test_stream_reader_gone_is_not_an_error() -> None:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader.close()
    loop = asyncio.new_event_loop()
    try:
        alog = AccessLog(loop, CFG, journal=False, stream_fd=writer.fileno())
        alog(proto(), 200, 5)
        loop.run_until_complete(asyncio.sleep(0))
        assert alog.dropped == 1 and alog.pending == b""
    finally:
        loop.close()
        writer.close()


def test_threaded_calls_are_flushed_on_the_loop() -> None:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    loop = asyncio.new_event_loop()
    try:
        alog = AccessLog(loop, CFG, journal=False, stream_fd=writer.fileno())
        t = threading.Thread(target=alog, args=(proto("/thread"), 200, 5))
        t.start()
        t.join()
        loop.run_until_complete(asyncio.sleep(0.01))
        assert b'"GET /thread HTTP/1.1" 200 5' in reader.recv(4096)
    finally:
        loop.close()
        reader.close()
        writer.close()


def test_log_handler_never_blocks_and_reports_what_it_dropped() -> None:
    """The worker's own log records (stderr, the journald stream): an app failing on every request while
    journald stalls must not stop the loop on tracebacks."""
    import logging

    from clusterctl.worker.accesslog import LogHandler

    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handler = LogHandler(writer.fileno())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test.accesslog.handler")
    log.propagate = False
    log.addHandler(handler)
    try:
        within(10, lambda: [log.error("record %d %s", i, "t" * 1000) for i in range(2000)])
        assert handler.dropped > 0, "2000 records of 1 KB fit in an unread socket? (raise the count)"
        reader.setblocking(False)
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := reader.recv(1 << 20):
                got += chunk
        dropped = handler.dropped
        log.error("after")
        tail = reader.recv(1 << 20).decode().splitlines()
        assert tail == [f"WARNING clusterctl.worker: dropped {dropped} log record(s): nobody read stderr at once",
                        "ERROR after"], tail
        assert got.startswith(b"ERROR record 0 ttt")
    finally:
        log.removeHandler(handler)
        reader.close()
        writer.close()
