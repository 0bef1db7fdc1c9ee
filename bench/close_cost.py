"""Where the instructions of one Connection: close request go (issue 21): callgrind, differenced.

Two kinds of figures, each instructions per connection (one request each), counted at two connection
counts and differenced so start-up cancels out (PYTHONHASHSEED=0: repeatable to ~0.1%):

* real sockets: a uvloop server in this process under callgrind, a plain client in another process that
  opens, sends wrk's close request, reads the answer, N times in a row. Servers: `floor` (a protocol that
  writes a canned answer and closes: uvloop's accept, transport, close and connection_lost alone),
  `floor+parser` (the same plus an httptools parser per connection, fed the request), `engine` (ours),
  `engine-compiled` (ours with the C fast lane, clusterctl/http/_fast.c), and `bjoern` (C, libev) when installed.
* pieces of the engine on bench_engine_cpu's fake transport, each step added to the one before, so a
  row is the difference of two runs: construction (and the free at the end), connection_made, parse,
  environ, app, head + write, close, connection_lost, and the cyclic GC's share (gc is off before it).

    .venv/bin/python bench/close_cost.py            # both tables (about 6 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_engine_cpu import CLOSE, FakeTransport  # noqa: E402

CANNED = b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\nconnection: close\r\n\r\nHello, world!\n"


class Floor(asyncio.Protocol):
    """The least a Python protocol can do per Connection: close request."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(CANNED)
        self.transport.close()


class FloorParser(Floor):
    """Floor plus an httptools parser per connection that parses the request (callbacks as the engine's)."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        import httptools

        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        self.transport.write(CANNED)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.parser = None


def serve_bjoern(n: int) -> None:
    """bjoern (C, libev) serving the same response; the client interrupts it after n connections."""
    import bjoern

    from bench.apps.hello_cl import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = subprocess.Popen([sys.executable, __file__, "--client", str(port), str(n), str(os.getpid())])
    with contextlib.suppress(KeyboardInterrupt):  # the client's signal when it is done
        bjoern.run(app, "127.0.0.1", port)
    client.wait()


def serve_real(kind: str, n: int) -> None:
    """Under callgrind: serve n connections on a socket, then exit. The client runs in a child process."""
    if kind == "bjoern":
        return serve_bjoern(n)
    import uvloop

    from examples.hello import app

    loop = uvloop.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    done = loop.create_future()
    count = [0]

    def counted(factory: Any) -> Any:
        def make() -> Any:
            count[0] += 1
            if count[0] == n:
                loop.call_later(0.5, done.set_result, None)  # the last one's close and connection_lost run first
            return factory()
        return make

    if kind.startswith("engine"):
        from clusterctl.http.loop import hide_running_loop
        from clusterctl.http.wsgi import WsgiServer as Server

        server = Server(app, loop)
        hide_running_loop(loop)
        if kind == "engine-compiled":
            from clusterctl.http import fastlane

            assert fastlane.install(server), fastlane.why_not()
        factory = server.protocol
    else:
        factory = Floor if kind == "floor" else FloorParser
    loop.run_until_complete(loop.create_server(counted(factory), sock=sock))
    client = subprocess.Popen([sys.executable, __file__, "--client", str(port), str(n)])
    loop.run_until_complete(done)
    client.wait()


def client(port: int, n: int, interrupt: int = 0) -> None:
    """n close requests in a row; then SIGINT to `interrupt` (bjoern's way out of its loop), if given."""
    import signal
    import time

    while interrupt:  # bjoern binds after this process starts
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.05)
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(CLOSE)
            while s.recv(4096):
                pass
    if interrupt:
        time.sleep(0.3)  # the last connection's close is handled first
        os.kill(interrupt, signal.SIGINT)


# -- the engine's pieces on a fake transport ---------------------------------------------------------------
# Each step does what the one before it did plus one more piece; the last is the whole request.
STEPS = ["construct", "connection_made", "parse", "environ", "app", "head+write+finish", "connection_lost",
         "gc"]


def pieces(step: str, n: int) -> None:
    import uvloop

    from clusterctl.http.wsgi import WsgiProtocol
    from clusterctl.http.wsgi import WsgiServer as Server
    from examples.hello import app

    upto = STEPS.index(step)
    loop = uvloop.new_event_loop()
    server = Server(app, loop)
    gc_on = upto >= STEPS.index("gc")
    if not gc_on:
        gc.disable()

    class Partial(WsgiProtocol):
        """handle() stops after the step: then the response is a canned write and finish(), as close mode."""

        __slots__ = ()

        def handle(self, req: Any, keep_alive: bool) -> None:
            if upto >= STEPS.index("head+write+finish"):
                return WsgiProtocol.handle(self, req, keep_alive)
            if upto >= STEPS.index("environ"):
                env = self.build_environ(req)
                if upto >= STEPS.index("app"):
                    self.status = None
                    self.app(env, self.start_response)
            self.busy = False
            self.server.in_flight -= 1
            self.closed = True  # what finish(False) -> close() leaves, without the pieces measured above

    server.protocol_class = Partial
    for _ in range(n):
        proto = server.protocol()
        if upto >= STEPS.index("connection_made"):
            t = FakeTransport()
            proto.connection_made(t)
            if upto >= STEPS.index("parse"):
                proto.data_received(CLOSE)
            if upto >= STEPS.index("connection_lost"):
                proto.connection_lost(None)
            else:  # what connection_lost would do for the set: else every make_room() walks them all
                server.connections.discard(proto)
        if upto < STEPS.index("connection_lost"):  # break the cycles as on_lost does: freed here, not leaked
            proto.parser = None
            proto.start_response = proto.write_cb = None
        del proto


def instructions(args: list[str]) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__, *args]
    err = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"}).stderr
    m = re.search(r"Collected\s*:\s*(\d+)", err)
    if not m:
        raise RuntimeError(err[-2000:])
    return int(m.group(1))


def per(args: list[str], lo: int, hi: int) -> float:
    return (instructions([*args, str(hi)]) - instructions([*args, str(lo)])) / (hi - lo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", choices=["real", "pieces"], help="only this table")
    ap.add_argument("--client", nargs="+", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--real", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--piece", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client(*args.client)
    if args.real:
        return serve_real(args.real[0], int(args.real[1]))
    if args.piece:
        return pieces(args.piece[0], int(args.piece[1]))
    if args.table != "pieces":
        print("real sockets, instructions per connection (server process only):")
        kinds = ["floor", "floor+parser", "engine", "engine-compiled"]
        try:
            import bjoern  # noqa: F401
            kinds.append("bjoern")
        except ImportError:
            print("  (bjoern skipped: apt-get install libev-dev; pip install bjoern)")
        for kind in kinds:
            print(f"  {kind:16} {per(['--real', kind], 200, 1200):9.0f}", flush=True)
    if args.table == "real":
        return
    print("engine pieces on a fake transport (each row: that step's own instructions):")
    before = 0.0
    for step in STEPS:
        total = per(["--piece", step], 1000, 6000)
        print(f"  {step:20} {total - before:9.0f}   (cumulative {total:.0f})", flush=True)
        before = total


if __name__ == "__main__":
    main()
