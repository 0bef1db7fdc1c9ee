"""ASGI WebSockets on our engine with a real client (`websockets`) over real sockets: a raw ASGI app and
Starlette in-process (tests/engine_thread.py), and the real worker under systemd-socket-activate for
SIGTERM -> 1001 and the STATUS= count."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Request, TextMessage

from clusterctl.http import websocket
from clusterctl.http.asgi import WS_MAX_SIZE, AsgiServer
from clusterctl.http.server import Limits
from tests.engine_thread import EngineThread
from tests.workerproc import Worker, connect_when_listening

REPO = Path(__file__).resolve().parent.parent
seen: list[dict[str, Any]] = []        # websocket scopes the app got
heard: list[dict[str, Any]] = []       # websocket.disconnect messages the app got
progress = {"sent": 0, "received": 0}  # /flood and /sink
release = asyncio.Event()              # /sink reads only once set (set from the test through the engine's loop)


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain http"})
        return
    seen.append(scope)
    assert (await receive())["type"] == "websocket.connect"
    path = scope["path"]
    if path == "/reject":
        await send({"type": "websocket.close", "code": 1000})
        return
    if path == "/boom":
        raise RuntimeError("boom before accept")
    if path == "/slow-accept":
        await asyncio.sleep(0.3)
    subprotocol = scope["subprotocols"][0] if scope["subprotocols"] else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": [(b"x-ws", b"yes")]})
    if path == "/close-4001":
        await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
        heard.append(await receive())
        return
    if path == "/flood":  # 2000 x 64 KiB to a client that does not read
        for i in range(2000):
            await send({"type": "websocket.send", "bytes": b"x" * 65536})
            progress["sent"] = i + 1
        return
    if path == "/sink":  # reads nothing until released
        await release.wait()
        n = 0
        while (await receive())["type"] == "websocket.receive":
            n += 1
            progress["received"] = n
        return
    if path == "/crash-after-accept":
        raise RuntimeError("boom after accept")
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            heard.append(msg)
            return
        await send({"type": "websocket.send", "text": msg.get("text"), "bytes": msg.get("bytes")})


class WsEngine(EngineThread):
    def __init__(self, app: Any, max_size: int = WS_MAX_SIZE, deflate: bool = True,
                 ping: tuple[float, float] | None = None) -> None:
        def make(loop: asyncio.AbstractEventLoop) -> AsgiServer:
            server = AsgiServer(app, loop, Limits())
            server.ws_max_size = max_size
            server.ws_deflate = deflate
            if ping is not None:
                server.ws_keepalive(*ping)
            server.state["greeting"] = "hello"
            return server

        super().__init__(make)
        self.url = f"ws://127.0.0.1:{self.port}"

    def ws(self) -> websocket.WebSocket:
        """The server side of the one open WebSocket (read from the test thread: counters only)."""
        (ws,) = [c.ws for c in list(self.server.connections) if c.ws is not None]
        return ws


@pytest.fixture
def engine() -> Iterator[WsEngine]:
    seen.clear()
    heard.clear()
    e = WsEngine(raw_app)
    yield e
    e.stop()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def wait_until(ok: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


async def open_clients(url: str, n: int) -> list[Any]:
    """n WebSockets, each with one echo answered (so the server side is surely open)."""
    clients = [await connect(url) for _ in range(n)]
    for c in clients:
        await c.send("x")
        assert await c.recv() == "x"
    return clients


async def close_code(ws: Any) -> int:
    """The close code the server sent, waiting for it (the client does not close first)."""
    with pytest.raises(ConnectionClosed) as err:
        await ws.recv()
    assert err.value.rcvd is not None
    return err.value.rcvd.code


def test_echo_text_binary_ping_and_scope(engine: WsEngine) -> None:
    async def go() -> None:
        async with connect(engine.url + "/echo/%C3%A9?x=1", subprotocols=["chat.v2", "chat.v1"]) as ws:
            assert ws.subprotocol == "chat.v2" and ws.response.headers["x-ws"] == "yes"
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
            pong = await ws.ping(b"p1")
            assert await asyncio.wait_for(pong, 2) >= 0  # our server answered the ping
            for i in range(200):
                await ws.send(f"m{i}")
            assert [await ws.recv() for _ in range(200)] == [f"m{i}" for i in range(200)]
            await ws.close(code=4002, reason="client done")

    run(go())
    scope = seen[-1]
    assert scope["type"] == "websocket" and scope["scheme"] == "ws" and scope["http_version"] == "1.1"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"} and scope["root_path"] == ""
    assert scope["path"] == "/echo/é" and scope["raw_path"] == b"/echo/%C3%A9" and scope["query_string"] == b"x=1"
    assert scope["subprotocols"] == ["chat.v2", "chat.v1"] and scope["state"] == {"greeting": "hello"}
    assert scope["client"][0] == "127.0.0.1" and scope["server"] == ("127.0.0.1", engine.port)
    assert (b"upgrade", b"websocket") in scope["headers"]
    wait_until(lambda: bool(heard))
    assert heard == [{"type": "websocket.disconnect", "code": 4002, "reason": "client done"}]
    wait_until(lambda: engine.server.websockets == 0 and engine.server.in_flight == 0)
    assert engine.server.served == 1


def test_close_codes_from_the_app_and_on_errors(engine: WsEngine) -> None:
    async def closed_with(path: str) -> tuple[int, str]:
        async with connect(engine.url + path) as ws:
            with pytest.raises(ConnectionClosed) as err:
                await ws.recv()
        assert err.value.rcvd is not None
        return err.value.rcvd.code, err.value.rcvd.reason

    assert run(closed_with("/close-4001")) == (4001, "bye")
    wait_until(lambda: bool(heard))
    assert heard[-1]["code"] == 4001  # the app hears the close it sent once the client answered
    assert run(closed_with("/crash-after-accept"))[0] == 1011


def test_reject_is_403_and_an_error_before_accept_500(engine: WsEngine) -> None:
    async def status(path: str) -> int:
        with pytest.raises(InvalidStatus) as err:
            async with connect(engine.url + path):
                pass
        return err.value.response.status_code

    assert run(status("/reject")) == 403
    assert run(status("/boom")) == 500
    # a broken handshake (no Sec-WebSocket-Key) is a 400 from wsproto's checks, and plain HTTP still works
    with socket.create_connection(("127.0.0.1", engine.port), timeout=3) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", engine.port), timeout=3) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).endswith(b"plain http")
    wait_until(lambda: engine.server.in_flight == 0)


def test_client_leaving_before_accept_ends_the_request(engine: WsEngine) -> None:
    """The app accepts after the client left: ClientDisconnected, and the request no longer counts in flight
    (a leak there would hold every drain until its deadline). Not an app error."""
    with socket.create_connection(("127.0.0.1", engine.port), timeout=3) as s:
        s.sendall(WSConnection(ConnectionType.CLIENT).send(Request(host="h", target="/slow-accept")))
        wait_until(lambda: engine.server.in_flight == 1)
    time.sleep(0.5)
    assert (engine.server.in_flight, engine.server.websockets, engine.server.errors) == (0, 0, 0)
    assert not engine.server.connections


def test_protocol_errors_close_with_1002(engine: WsEngine) -> None:
    """wsproto's checks are ours: an unmasked client frame is a protocol error, answered with close 1002."""
    client = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", engine.port), timeout=3) as s:
        s.sendall(client.send(Request(host="h", target="/echo")))
        client.receive_data(s.recv(4096))
        assert isinstance(next(client.events()), AcceptConnection)
        s.sendall(Connection(ConnectionType.SERVER).send(TextMessage(data="unmasked")))  # server frames are unmasked
        closes: list[CloseConnection] = []
        while not closes:
            chunk = s.recv(65536)
            assert chunk, "closed without a close frame"
            client.receive_data(chunk)
            closes += [e for e in client.events() if isinstance(e, CloseConnection)]
        assert closes[0].code == 1002
    wait_until(lambda: bool(heard))
    assert heard[-1]["code"] == 1002


def test_frames_in_the_same_read_as_the_upgrade_head_reach_wsproto(engine: WsEngine) -> None:
    """A client may pipeline its first frames behind the handshake: none of those bytes may be lost."""
    client = WSConnection(ConnectionType.CLIENT)
    data = client.send(Request(host="h", target="/echo"))
    data += Connection(ConnectionType.CLIENT).send(TextMessage(data="early bird"))  # a masked client frame
    with socket.create_connection(("127.0.0.1", engine.port), timeout=3) as s:
        s.sendall(data)  # one write: head and frame together
        got: list[Any] = []
        while not any(isinstance(e, TextMessage) for e in got):
            chunk = s.recv(65536)
            assert chunk, "closed before the echo"
            client.receive_data(chunk)
            got += list(client.events())
        assert isinstance(got[0], AcceptConnection)
        assert [e.data for e in got if isinstance(e, TextMessage)] == ["early bird"]
        s.sendall(client.send(CloseConnection(code=1000)))


def test_oversize_message_closes_1009() -> None:
    e = WsEngine(raw_app, max_size=100_000)
    try:
        async def go() -> tuple[int, str]:
            async with connect(e.url + "/echo", max_size=None) as ws:
                await ws.send(b"a" * 100_000)  # at the limit: fine
                assert len(await ws.recv()) == 100_000
                await ws.send([b"b" * 60_000, b"c" * 60_000])  # fragmented, 120 000 in all
                with pytest.raises(ConnectionClosed) as err:
                    await ws.recv()
            assert err.value.rcvd is not None
            return err.value.rcvd.code, err.value.rcvd.reason

        heard.clear()
        code, reason = run(go())
        assert code == 1009 and "100000" in reason
        wait_until(lambda: bool(heard))
        assert heard[-1]["code"] == 1009
    finally:
        e.stop()


def test_permessage_deflate_negotiated_and_bounded() -> None:
    for deflate in (True, False):
        e = WsEngine(raw_app, max_size=1_000_000, deflate=deflate)
        try:
            async def go(url: str) -> tuple[str | None, int]:
                async with connect(url + "/echo", max_size=None) as ws:
                    ext = ws.response.headers.get("sec-websocket-extensions")
                    await ws.send("z" * 500_000)  # compresses to a few hundred bytes
                    assert await ws.recv() == "z" * 500_000
                    await ws.send(b"\x00" * 3_000_000)  # a small compressed frame inflating past the limit
                    with pytest.raises(ConnectionClosed) as err:
                        await ws.recv()
                    assert err.value.rcvd is not None
                    return ext, err.value.rcvd.code

            ext, code = run(go(e.url))
            assert (ext is not None and ext.startswith("permessage-deflate")) == deflate
            assert code == 1009
        finally:
            e.stop()


def test_backpressure_to_a_slow_reader(engine: WsEngine) -> None:
    """The app's sends wait while the client does not read: nothing piles up in the worker. (A raw socket
    client: it reads nothing until told, where a library client would keep reading into its own buffers.)"""
    progress["sent"] = 0
    client = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as s:
        s.sendall(client.send(Request(host="h", target="/flood")))
        time.sleep(1.0)
        stalled_at = progress["sent"]
        buffered = engine.ws().proto.transport.get_write_buffer_size()
        assert 0 < stalled_at < 400, stalled_at  # 2000 messages = 125 MiB: only socket buffers' worth went out
        assert buffered < 1 << 20, buffered       # and our transport holds about its high-water mark, no more
        time.sleep(0.3)
        assert progress["sent"] == stalled_at     # still waiting, not buffering
        n = 0
        while n < 2000:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {n} messages"
            client.receive_data(chunk)
            n += sum(1 for e in client.events() if isinstance(e, BytesMessage) and e.message_finished)
    assert progress["sent"] == 2000


def test_backpressure_from_a_fast_sender(engine: WsEngine) -> None:
    """The worker stops reading while the app has not taken its messages: its queue stays small and the
    client's sends block (only the kernel's socket buffers fill)."""
    progress["received"] = 0
    client = WSConnection(ConnectionType.CLIENT)
    frame = Connection(ConnectionType.CLIENT).send(BytesMessage(data=b"y" * 65536))
    engine.loop.call_soon_threadsafe(release.clear)
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as s:
        s.sendall(client.send(Request(host="h", target="/sink")))
        assert s.recv(4096).startswith(b"HTTP/1.1 101")
        s.setblocking(False)
        pending, frames, sent = b"", 0, 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            pending = pending or frame
            try:
                n = s.send(pending)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            sent += n
            pending = pending[n:]
            frames += not pending
        assert sent < 64 << 20, f"{sent} bytes taken: the worker kept reading"
        ws_side = engine.ws()
        assert ws_side.paused and len(ws_side.inbox) <= websocket.QUEUE_MESSAGES
        assert ws_side.inbox_bytes <= websocket.QUEUE_BYTES and len(ws_side.rx) <= websocket.PLAIN_SLICE
        engine.loop.call_soon_threadsafe(release.set)
        s.setblocking(True)
        if pending:
            s.sendall(pending)
            frames += 1
        wait_until(lambda: progress["received"] == frames)
        s.sendall(Connection(ConnectionType.CLIENT).send(CloseConnection(code=1000)))


def test_drain_closes_with_1001(engine: WsEngine) -> None:
    async def go() -> list[int]:
        clients = await open_clients(engine.url + "/echo", 3)
        assert engine.server.websockets == 3
        engine.loop.call_soon_threadsafe(engine.server.begin_drain)
        return [await close_code(c) for c in clients]

    assert run(go()) == [1001, 1001, 1001]
    wait_until(lambda: not engine.server.connections)
    assert sorted(m["code"] for m in heard) == [1001, 1001, 1001]
    assert engine.server.websockets == 0


STARLETTE_WS = '''
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocketDisconnect

async def echo(ws):
    await ws.accept(subprotocol="v1")
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await ws.send_json({"echo": msg["text"], "path": ws.url.path})
            else:
                await ws.send_bytes(msg["bytes"][::-1])
    except WebSocketDisconnect:
        pass

async def deny(ws):
    await ws.close()

app = Starlette(routes=[WebSocketRoute("/ws", echo), WebSocketRoute("/deny", deny)])
'''


def test_starlette_websocket() -> None:
    pytest.importorskip("starlette")
    ns: dict[str, Any] = {}
    exec(compile(STARLETTE_WS, "starlette_ws", "exec"), ns)
    e = WsEngine(ns["app"])
    try:
        async def go() -> None:
            async with connect(e.url + "/ws", subprotocols=["v1"]) as ws:
                assert ws.subprotocol == "v1"
                await ws.send("hi")
                assert await ws.recv() == '{"echo":"hi","path":"/ws"}'
                await ws.send(b"abc")
                assert await ws.recv() == b"cba"
            with pytest.raises(InvalidStatus) as err:
                async with connect(e.url + "/deny"):
                    pass
            assert err.value.response.status_code == 403

        run(go())
    finally:
        e.stop()


def test_sigterm_closes_websockets_1001_and_status_counts_them(spawn: Callable[..., Worker]) -> None:
    w = spawn("--app", "examples.wsecho:app", "--no-access-log", "--drain-timeout", "10")
    connect_when_listening(w.port).close()
    w.notify.wait_for("READY=1")

    async def go() -> list[int]:
        clients = await open_clients(f"ws://127.0.0.1:{w.port}/ws", 3)
        await asyncio.to_thread(w.notify.wait_for, "websockets=3", 5)
        os.kill(w.proc.pid, signal.SIGTERM)
        return [await close_code(c) for c in clients]

    t0 = time.monotonic()
    assert run(go()) == [1001, 1001, 1001]
    assert w.proc.wait(10) == 0  # drained, not force-closed at the deadline
    assert time.monotonic() - t0 < 8


def test_drain_deadline_cuts_a_client_that_never_answers_the_close(spawn: Callable[..., Worker]) -> None:
    """A client that neither reads nor answers 1001 holds the worker only until --drain-timeout (exit 1)."""
    w = spawn("--app", "examples.wsecho:app", "--no-access-log", "--drain-timeout", "1")
    s = connect_when_listening(w.port)
    w.notify.wait_for("READY=1")
    s.sendall(WSConnection(ConnectionType.CLIENT).send(Request(host="h", target="/ws")))
    assert s.recv(4096).startswith(b"HTTP/1.1 101")
    t0 = time.monotonic()
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 1
    assert 0.9 < time.monotonic() - t0 < 4
    _, err = w.output()
    assert "drain timeout: closing 1 connection(s)" in err
    s.close()


def test_status_column_only_where_workers_report_websockets() -> None:
    from clusterctl import statusline
    from clusterctl.cli.table import INSTANCE_HEAD, instance_cells, ws_column

    assert statusline.parse("served=5 in_flight=0 errors=0 connections=3 websockets=2").get("websockets") == 2
    assert statusline.parse("served=5 in_flight=0 errors=0 connections=3").get("websockets") is None  # WSGI worker
    rows = [{"instance": "1", "websockets": 2}, {"instance": "2", "websockets": None}]
    ws = ws_column(rows)
    assert ws == ["websockets"] and [instance_cells(r, ws)[-1] for r in rows] == ["2", "-"]
    assert ws_column([{"websockets": None}]) == [] and len(instance_cells(rows[0])) == len(INSTANCE_HEAD)


def test_other_upgrades_get_plain_http_and_close(engine: WsEngine) -> None:
    """WSGI apps, and other upgrades (h2c) on ASGI: the request is answered as HTTP/1.1 and the connection
    closes; bytes after the head are never parsed as another request."""
    from clusterctl.http.wsgi import WsgiServer

    def wsgi(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"wsgi here"]

    w = EngineThread(lambda loop: WsgiServer(wsgi, loop))
    try:
        for port, upgrade, body in ((w.port, b"websocket", b"wsgi here"), (engine.port, b"h2c", b"plain http")):
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: " + upgrade +
                          b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(body) and data.count(b"HTTP/1.1") == 1
    finally:
        w.stop()


# --- keepalive pings (--ws-ping-interval, --ws-ping-timeout) ---------------------------------------------------

class FrameLog(logging.Handler):
    """The frames a `websockets` client received, with their arrival times (its debug log: `< FRAME`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.frames: list[tuple[float, Any]] = []
        self.logger = logging.getLogger(f"test-ws-frames-{id(self)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "< %s" and record.args:
            self.frames.append((time.monotonic(), record.args[0]))  # type: ignore[index]

    def pings(self) -> list[float]:
        return [t for t, f in self.frames if isinstance(f, Frame) and f.opcode is Opcode.PING]


def raw_open(port: int, path: str = "/echo") -> tuple[socket.socket, WSConnection]:
    """A WebSocket through a raw socket: the handshake, then nothing unless the test says so (no automatic
    pongs: what a dead or stuck peer looks like)."""
    client = WSConnection(ConnectionType.CLIENT)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(client.send(Request(host="h", target=path)))
    client.receive_data(s.recv(4096))
    assert isinstance(next(client.events()), AcceptConnection)
    return s, client


def read_until_closed(s: socket.socket, client: WSConnection) -> tuple[list[float], CloseConnection | None, float]:
    """Reads (without answering) until EOF: the pings' arrival times, the close frame, when the socket ended."""
    pings: list[float] = []
    close = None
    while chunk := s.recv(65536):
        client.receive_data(chunk)
        for e in client.events():
            if isinstance(e, Ping):
                pings.append(time.monotonic())
            elif isinstance(e, CloseConnection):
                close = e
    return pings, close, time.monotonic()


@pytest.fixture
def pinging() -> Iterator[Callable[[float, float], WsEngine]]:
    """`pinging(interval, timeout)`: an engine serving raw_app with those keepalive settings, stopped after."""
    engines: list[WsEngine] = []
    heard.clear()

    def make(interval: float, timeout: float) -> WsEngine:
        engines.append(WsEngine(raw_app, ping=(interval, timeout)))
        return engines[-1]

    yield make
    for e in engines:
        e.stop()


Pinging = Callable[[float, float], WsEngine]


def test_keepalive_pings_arrive_at_the_interval_and_answered_ones_keep_it_open(pinging: Pinging) -> None:
    """Interval 0.4 s, timeout 0.6 s: a real client (its own pings off, it answers ours) sees a ping about every
    0.4 s and stays open well past the timeout, however idle."""
    e = pinging(0.4, 0.6)
    frames = FrameLog()

    async def go() -> None:
        async with connect(e.url + "/echo", ping_interval=None, logger=frames.logger) as ws:
            t0 = time.monotonic()
            await asyncio.sleep(2.5)
            await ws.send("still here")
            assert await ws.recv() == "still here"
            pings = frames.pings()
            assert 4 <= len(pings) <= 7, pings
            assert 0.2 < pings[0] - t0 < 0.7
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert all(0.3 < g < 0.75 for g in gaps), gaps

    run(go())
    assert not any(m["code"] == 1011 for m in heard)


def test_a_peer_that_never_answers_is_closed_1011_within_interval_plus_timeout(pinging: Pinging) -> None:
    e = pinging(0.4, 0.6)
    s, client = raw_open(e.port)
    with s:
        t0 = time.monotonic()
        wait_until(lambda: e.server.websockets == 1)
        pings, close, t_end = read_until_closed(s, client)
    assert close is not None and close.code == 1011 and close.reason == "keepalive ping timeout"
    assert 1 <= len(pings) <= 3, pings
    # closed 0.6 s after the first ping (0.4 s in), give or take a sweep (0.1 s) and a loaded machine
    assert 0.9 < t_end - t0 < 1.0 + 0.6, t_end - t0
    wait_until(lambda: bool(heard))
    assert heard == [{"type": "websocket.disconnect", "code": 1011, "reason": "keepalive ping timeout"}]
    wait_until(lambda: e.server.websockets == 0 and not e.server.connections)
    assert e.server.errors == 0


def test_data_from_the_peer_counts_as_an_answer(pinging: Pinging) -> None:
    """A client that never pongs but keeps sending messages is alive: it is not closed."""
    e = pinging(0.2, 0.3)
    s, client = raw_open(e.port)
    with s:
        s.settimeout(0.05)
        end = time.monotonic() + 1.5
        echoes = 0
        while time.monotonic() < end:
            s.sendall(client.send(TextMessage(data="tick")))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            assert chunk, "closed although it kept sending"
            client.receive_data(chunk)
            for ev in client.events():
                assert not isinstance(ev, CloseConnection), ev
                echoes += isinstance(ev, TextMessage)
            time.sleep(0.1)
        assert echoes > 5 and e.server.websockets == 1
        s.sendall(client.send(CloseConnection(code=1000)))


def test_a_peer_that_stopped_reading_is_aborted(pinging: Pinging) -> None:
    """When not even the close frame can be written (the peer reads nothing and our write buffer is full),
    the connection is aborted: the worker does not hold it until the stalled-write timeout (30 s)."""
    e = pinging(0.3, 0.3)
    progress["sent"] = 0
    s, _client = raw_open(e.port, "/flood")
    with s:
        t0 = time.monotonic()
        wait_until(lambda: progress["sent"] > 0)
        wait_until(lambda: e.server.websockets == 0 and not e.server.connections, timeout=3)
        assert time.monotonic() - t0 < 2.0
        sent = progress["sent"]
        assert sent < 400  # the app's sends were waiting, then the next one raised ClientDisconnected
    time.sleep(0.1)
    assert progress["sent"] == sent and e.server.errors == 0


def test_interval_0_sends_no_pings_and_closes_nobody(pinging: Pinging) -> None:
    e = pinging(0.0, 0.2)
    s, client = raw_open(e.port)
    with s:
        s.settimeout(1.5)
        with pytest.raises(TimeoutError):
            s.recv(65536)  # 1.5 s: no ping, no close
        s.settimeout(5)
        s.sendall(client.send(TextMessage(data="hello")))
        client.receive_data(s.recv(65536))
        assert [ev.data for ev in client.events() if isinstance(ev, TextMessage)] == ["hello"]
        s.sendall(client.send(CloseConnection(code=1000)))


def test_worker_flags_reach_the_keepalive(spawn: Callable[..., Worker]) -> None:
    """--ws-ping-interval/--ws-ping-timeout through the real worker's command line."""
    w = spawn("--app", "examples.wsecho:app", "--no-access-log", "--ws-ping-interval", "0.3",
              "--ws-ping-timeout", "0.3")
    connect_when_listening(w.port).close()
    w.notify.wait_for("READY=1")
    s, client = raw_open(w.port, "/ws")
    with s:
        t0 = time.monotonic()
        pings, close, t_end = read_until_closed(s, client)
    assert pings and close is not None and close.code == 1011
    assert t_end - t0 < 2.0


@pytest.mark.parametrize("args,message", [
    (["--ws-ping-timeout", "0"], "--ws-ping-timeout 0 is out of range"),
    (["--ws-ping-interval", "-1"], "--ws-ping-interval -1 is out of range"),
    (["--ws-ping-interval", "nan"], "--ws-ping-interval nan is out of range"),
    (["--ws-max-size", "0"], "--ws-max-size 0 is not a positive number of bytes"),
])
def test_worker_refuses_bad_ws_settings(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "clusterctl.worker", "--app", "examples.wsecho:app", *args],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 2 and message in r.stderr and "(fix: " in r.stderr, r.stderr
