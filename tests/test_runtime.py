"""The worker process end to end: real fd passing (systemd-socket-activate), a real notify socket.

The test plays systemd: it owns an AF_UNIX datagram socket as NOTIFY_SOCKET and reads READY=1 /
STATUS= / WATCHDOG=1 / STOPPING=1 from it, sends signals by PID and checks exit codes. Every process
started here is killed by PID in the fixture's teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.workerproc import SSA, Notify, Worker, assert_fails_before_ready, connect_when_listening

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not os.path.exists(SSA), reason="systemd-socket-activate not installed")


def test_ready_only_after_import_and_serving(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    (tmp_path / "slowapp.py").write_text(
        "import time\ntime.sleep(0.6)\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'slow import ok']\n")
    w = spawn("--app", "slowapp:app", "--no-access-log", cwd=tmp_path)
    first = connect_when_listening(w.port)  # triggers the exec; this connection waits in the queue
    t0 = time.monotonic()
    t_ready, msg = w.notify.wait_for("READY=1")
    assert t_ready - t0 >= 0.5, "READY=1 came before the app was imported"
    assert f"MAINPID={w.proc.pid}" in msg  # systemd-socket-activate execs: same pid, LISTEN_PID matches
    # The connection made before READY was queued by the kernel and is answered.
    assert w.request("/", sock=first).endswith(b"slow import ok")
    assert w.request("/").endswith(b"slow import ok")


READY_APP = (
    "import os\n"
    "def app(environ, start_response):\n"
    "    if environ['PATH_INFO'] == '/ready' and not os.path.exists('warm'):\n"
    "        start_response('503 Service Unavailable', [('Content-Type', 'text/plain')])\n"
    "        return [b'warming up']\n"
    "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
    "    return [b'served ' + environ['PATH_INFO'].encode()]\n")


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_ready_path_gates_serving_and_ready(spawn: Callable[..., Worker], tmp_path: Path, interface: str) -> None:
    """--ready-path: no READY=1 and no request served until GET PATH answers 2xx through the engine."""
    (tmp_path / "readyapp.py").write_text(READY_APP)
    app = "readyapp:app"
    if interface == "asgi":
        (tmp_path / "readyasgi.py").write_text(
            "import os\n"
            "async def app(scope, receive, send):\n"
            "    if scope['type'] != 'http':\n"
            "        return\n"
            "    ok = scope['path'] != '/ready' or os.path.exists('warm')\n"
            "    await send({'type': 'http.response.start', 'status': 200 if ok else 503, 'headers': []})\n"
            "    await send({'type': 'http.response.body', 'body': b'served ' + scope['path'].encode()})\n")
        app = "readyasgi:app"
    w = spawn("--app", app, "--ready-path", "/ready", "--no-access-log", cwd=tmp_path)
    first = connect_when_listening(w.port)
    w.notify.wait_for("STATUS=waiting for GET /ready to answer 2xx (last: 503 Service Unavailable)")
    assert not any("READY=1" in m for m in w.notify.drain(1.0))
    (tmp_path / "warm").write_text("")
    w.notify.wait_for("READY=1")
    assert w.request("/x", sock=first).endswith(b"served /x")  # queued before READY, answered after
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 0
    assert "ready: GET /ready answered 200 OK" in w.output()[1]


def test_ready_path_must_be_a_path(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "examples.hello:app", "--ready-path", "health", ssa=False)
    assert w.proc.wait(10) == 2
    assert "--ready-path 'health' is not a request path (fix: e.g. --ready-path /health)" in w.output()[1]


def test_engine_must_be_one_of_the_engines(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    w = spawn("--app", "examples.hello:app", "--engine", "fast", ssa=False)
    assert w.proc.wait(10) == 2
    assert "--engine 'fast' is not an engine (fix: use one of auto, compiled, python)" in w.output()[1]
    (tmp_path / "asgiapp.py").write_text("async def app(scope, receive, send):\n    pass\n")
    w = spawn("--app", "asgiapp:app", "--engine", "compiled", cwd=tmp_path)
    assert_fails_before_ready(w, "--engine compiled: the compiled engine serves WSGI apps; this app is ASGI")


def test_status_updates_and_access_log(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "examples.hello:app", "--instance", "7")
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    assert w.request("/pid", sock=first).endswith(f"{w.proc.pid} 7\n".encode())
    for _ in range(2):
        assert b"Hello, world!" in w.request("/")
    _, msg = w.notify.wait_for("served=3 ", timeout=5)
    assert "in_flight=0 errors=0" in msg
    os.kill(w.proc.pid, signal.SIGTERM)
    out, _ = w.output()
    assert w.proc.returncode == 0
    assert out.count('"GET / HTTP/1.1" 200 14') == 2


@pytest.mark.parametrize("threads", ["0", "4"])
def test_sigterm_lets_a_slow_request_finish(spawn: Callable[..., Worker], threads: str) -> None:
    w = spawn("--app", "examples.hello:app", "--threads", threads, "--drain-timeout", "10")
    slow = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    slow.sendall(b"GET /slow?seconds=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(w.proc.pid, signal.SIGTERM)
    slow.settimeout(10)
    data = b""
    while chunk := slow.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"slept 1.0\n")
    assert w.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    w.notify.wait_for("STOPPING=1", timeout=2)


def test_drain_deadline_force_closes_and_exits_1(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "examples.hello:app", "--threads", "2", "--drain-timeout", "0.5")
    slow = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    slow.sendall(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(0.2)
    t0 = time.monotonic()
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 1
    assert time.monotonic() - t0 < 3
    slow.close()


def test_second_signal_forces_exit_1(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "examples.hello:app", "--threads", "2", "--drain-timeout", "20")
    slow = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    slow.sendall(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(0.2)
    os.kill(w.proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert w.proc.poll() is None  # still draining
    os.kill(w.proc.pid, signal.SIGINT)
    assert w.proc.wait(5) == 1
    slow.close()


def test_max_requests_recycles_with_exit_0(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "examples.hello:app", "--max-requests", "3", "--no-access-log")
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    w.request("/", sock=first)
    w.request("/")
    w.request("/")
    assert w.proc.wait(5) == 0
    assert "recycling after 3 requests" in w.output()[1]


GROW_APP = (
    "kept = []\n"
    "def app(environ, start_response):\n"
    "    if environ['PATH_INFO'] == '/grow':\n"
    "        kept.append(bytearray(160 << 20))  # zero-filled: touched, so resident\n"
    "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
    "    return [b'ok']\n")


def test_max_memory_restart_recycles_with_exit_0(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    (tmp_path / "growapp.py").write_text(GROW_APP)
    w = spawn("--app", "growapp:app", "--max-memory-restart", "128M", "--no-access-log", cwd=tmp_path)
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    assert w.request("/", sock=first).endswith(b"ok")
    time.sleep(1.3)
    assert w.proc.poll() is None  # a fresh worker is well under 128 MiB: it keeps serving
    assert w.request("/grow").endswith(b"ok")  # the request completes; the check runs after it
    assert w.proc.wait(5) == 0
    assert "over --max-memory-restart 128.0 MiB" in w.output()[1]


def test_max_memory_restart_below_a_fresh_worker_is_refused_not_looped(spawn: Callable[..., Worker],
                                                                       tmp_path: Path) -> None:
    w = spawn("--app", "examples.hello:app", "--max-memory-restart", "1M", "--no-access-log")
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    time.sleep(1.3)
    assert w.proc.poll() is None and w.request("/", sock=first).endswith(b"Hello, world!\n")
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 0
    assert "--max-memory-restart 1.0 MiB is below this worker's resident memory right after start" in w.output()[1]


def test_watchdog_pings_through_a_request_within_timeout(spawn: Callable[..., Worker]) -> None:
    """A request longer than the watchdog interval but within --timeout is app work, not a hang: the monitor
    thread keeps WATCHDOG=1 going while the loop is busy in the app, and the request is answered."""
    w = spawn("--app", "examples.hello:app", "--no-access-log", "--timeout", "5", "--keepalive-timeout", "0.4",
              env={"WATCHDOG_USEC": "200000"})  # ticks every 0.1 s: a loop quiet for 0.15 s would count as blocked
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    msgs = w.notify.drain(0.55)
    assert sum("WATCHDOG=1" in m for m in msgs) >= 3  # every 0.1 s
    first.sendall(b"GET /slow?seconds=1.2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")  # 1.2 s in the app
    w.notify.drain(0.1)
    n = len(w.notify.messages)
    later = w.notify.drain(0.9)[n:]
    assert sum("WATCHDOG=1" in m for m in later) >= 5, later
    first.settimeout(10)
    assert first.recv(4096).startswith(b"HTTP/1.1 200 OK")
    first.close()
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 0


@pytest.mark.parametrize("threads", ["0", "2"])
def test_request_over_timeout_is_named_and_the_worker_exits(spawn: Callable[..., Worker], threads: str) -> None:
    w = spawn("--app", "examples.hello:app", "--no-access-log", "--timeout", "0.6", "--instance", "7",
              "--threads", threads, env={"WATCHDOG_USEC": "200000"})
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    first.sendall(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    t0 = time.monotonic()
    assert w.proc.wait(10) == 1  # systemd's Restart=on-failure replaces it
    assert time.monotonic() - t0 < 3
    _, err = w.output()
    line = next(x for x in err.splitlines() if "request timeout" in x)
    assert "GET /slow?seconds=30 has run" in line and "over --timeout 0.6 s on instance 7" in line, err
    assert "examples/hello.py" in err and "time.sleep" in err  # where the app was stuck
    first.close()


BLOCKING_ASGI = (
    "import time\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        return\n"
    "    if scope['path'] == '/block':\n"
    "        time.sleep(3)  # blocking code in an async handler: the loop stops, outside any WSGI app call\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
)


def test_loop_blocked_outside_app_code_stops_the_watchdog(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    (tmp_path / "blocking.py").write_text(BLOCKING_ASGI)
    w = spawn("--app", "blocking:app", "--no-access-log", "--keepalive-timeout", "0.4", cwd=tmp_path,
              env={"WATCHDOG_USEC": "200000", "PYTHONPATH": f"{tmp_path}:{REPO}"})
    first = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    first.sendall(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
    w.notify.drain(0.6)  # the monitor sees no loop tick for 2 ticks + a period (0.25 s here)
    n = len(w.notify.messages)
    later = w.notify.drain(1.5)[n:]
    assert not any("WATCHDOG=1" in m for m in later), "a blocked loop must stop pinging"
    first.close()
    os.kill(w.proc.pid, signal.SIGKILL)
    _, err = w.output()
    assert "the event loop has not run for" in err and "WatchdogSec=" in err


def test_bad_timeout_is_one_error_line(spawn: Callable[..., Worker]) -> None:
    for bad in ("0", "-1", "nan"):
        w = spawn("--app", "examples.hello:app", "--timeout", bad, ssa=False)
        _, err = w.output()
        assert w.proc.returncode == 2 and f"--timeout {bad} is out of range" in err and "Traceback" not in err


def test_no_sockets_is_a_clear_error(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "examples.hello:app", ssa=False)
    _, err = w.output()
    assert w.proc.returncode == 2
    assert "no listening sockets" in err and "systemd-socket-activate" in err and "--bind" in err
    assert "Traceback" not in err


def test_bad_app_is_a_clear_error(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "no_such_module:app", "--bind", f"127.0.0.1:{free_port()}", ssa=False)
    _, err = w.output()
    assert w.proc.returncode == 2
    assert "cannot import module 'no_such_module'" in err and "Traceback" not in err
    w = spawn("--app", "examples.hello:nope", "--bind", f"127.0.0.1:{free_port()}", ssa=False)
    _, err = w.output()
    assert w.proc.returncode == 2 and "has no attribute 'nope'" in err


def test_bind_port_in_use_is_a_clear_error(spawn: Callable[..., Worker]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        w = spawn("--app", "examples.hello:app", "--bind", f"127.0.0.1:{port}", ssa=False)
        _, err = w.output()
    assert w.proc.returncode == 2 and "cannot listen on" in err


def test_two_workers_share_one_socket(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    """Layout (b): siblings accept from one non-blocking socket; losing an accept race (EAGAIN) is fine."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    port = lsock.getsockname()[1]
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                "os.execv(sys.executable, [sys.executable, '-m', 'clusterctl.worker', *sys.argv[2:]])")
    procs = []
    try:
        for i in range(2):
            notify = Notify(tmp_path / f"n{i}")
            p = subprocess.Popen(
                [sys.executable, "-c", launcher, str(lsock.fileno()), "--app", "examples.hello:app",
                 "--no-access-log", "--instance", str(i)],
                cwd=REPO, pass_fds=(lsock.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={**os.environ, "NOTIFY_SOCKET": notify.path, "PYTHONPATH": str(REPO)})
            procs.append(p)
            notify.wait_for("READY=1")
        lsock.close()  # only the workers hold it now
        pids = set()
        w = Worker(procs[0], port, None)
        for _ in range(300):
            body = w.request("/pid")
            assert body.startswith(b"HTTP/1.1 200")
            pids.add(body.rsplit(b"\r\n\r\n", 1)[1].split()[0])
        assert len(pids) == 2
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(5)


def test_clusterctl_run_serves_with_bind() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clusterctl", "run", "--app", "examples.hello:app",
                             "--bind", f"127.0.0.1:{port}", "--no-access-log"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        s = connect_when_listening(port)
        w = Worker(proc, port, None)
        assert w.request("/health", sock=s).endswith(b"ok\n")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


# --- MemoryDenyWriteExecute: an app that needs W+X memory is told about --allow-wx --------------------------

CFFI_REFUSED = "Cannot allocate write+execute memory for ffi.callback(). You might be running on a system that prevents this."


def test_import_needing_wx_memory_names_allow_wx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clusterctl.errors import ClusterctlError
    from clusterctl.worker import runtime

    (tmp_path / "wxapp.py").write_text(f"raise MemoryError({CFFI_REFUSED!r})\n")
    (tmp_path / "otherapp.py").write_text("raise MemoryError('out of memory')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ClusterctlError) as e:
        runtime.load_app("wxapp:app")
    assert "MemoryError: Cannot allocate write+execute" in e.value.message
    assert e.value.fix and "--allow-wx" in e.value.fix and "MemoryDenyWriteExecute=yes" in e.value.fix
    with pytest.raises(ClusterctlError) as e:
        runtime.load_app("otherapp:app")
    assert e.value.fix and "--allow-wx" not in e.value.fix


def test_logged_errors_needing_wx_memory_name_allow_wx(caplog: pytest.LogCaptureFixture) -> None:
    """A callback made while serving: the engine logs the app's exception; the hint is added to that line."""
    import logging

    from clusterctl.worker import runtime

    hint = runtime.WxHint()
    caplog.handler.addFilter(hint)
    try:
        log = logging.getLogger("clusterctl.engine")
        for exc in (MemoryError(CFFI_REFUSED), ValueError("other")):
            try:
                try:
                    raise exc
                except MemoryError as inner:
                    raise RuntimeError("wrapped") from inner
            except Exception:
                log.exception("error in WSGI app handling %s", "GET / HTTP/1.1")
    finally:
        caplog.handler.removeFilter(hint)
    first, second = caplog.records
    assert "--allow-wx" in first.getMessage() and first.getMessage().startswith("error in WSGI app handling GET /")
    assert "--allow-wx" not in second.getMessage()
