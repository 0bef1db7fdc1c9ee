"""CPU cost of the engine per request, without sockets: the figure to trust on a shared, noisy machine.

A fake transport stands in for uvloop's: requests are fed straight into `data_received` and responses
land in a counter, so what is measured is exactly our Python (parser callbacks, environ, app call,
head, write) plus httptools. wrk's keep-alive loop is one request per read, so that is the main case.

    .venv/bin/python bench/bench_engine_cpu.py                   # µs/request, best of --repeat runs
    .venv/bin/python bench/bench_engine_cpu.py --instructions    # + instructions/request (callgrind)
    .venv/bin/python bench/bench_engine_cpu.py --profile wrk     # cProfile of one scenario
    .venv/bin/python bench/bench_engine_cpu.py --engine compiled # the C fast lane (clusterctl/http/_fast.c)

Instructions are counted with callgrind at two request counts and differenced, so start-up and import
costs cancel out (perf counters are not available in these VMs). They are stable to ~0.1% between runs
whatever the load on the machine; µs/request are not.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# wrk's request, byte for byte (wrk -c50 http://127.0.0.1:8000/).
WRK = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
# A browser-like request: more headers, a query string, a cookie.
BROWSER = (b"GET /items?page=2&sort=name HTTP/1.1\r\nHost: example.com\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
           b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
           b"Connection: keep-alive\r\nCookie: session=abc123; theme=dark\r\n"
           b"Upgrade-Insecure-Requests: 1\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
POST = (b"POST /submit HTTP/1.1\r\nHost: example.com\r\nContent-Type: application/json\r\n"
        b"Content-Length: 27\r\n\r\n{\"name\": \"x\", \"value\": 42}\n")
# wrk -H "Connection: close": one request per connection.
CLOSE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nConnection: close\r\n\r\n"
# scenario -> (one read's bytes, requests in it); "close" also opens and closes a connection per request
# (the protocol's side of it: construction, connection_made, connection_lost; not uvloop's accept).
SCENARIOS: dict[str, tuple[bytes, int]] = {
    "wrk": (WRK, 1),
    "browser": (BROWSER, 1),
    "post": (POST, 1),
    "pipelined16": (WRK * 16, 16),
    "close": (CLOSE, 1),
}
SCENARIOS.update({f"asgi-{k}": v for k, v in list(SCENARIOS.items())})


class FakeTransport:
    """Just enough of an asyncio transport; counts what is written."""

    __slots__ = ("closed", "last", "nbytes", "writes")

    def __init__(self) -> None:
        self.writes = 0
        self.nbytes = 0
        self.closed = False
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.nbytes += len(data)
        self.last = data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


ENGINE = "python"  # --engine: which WSGI protocol make() gives the server


def make(access_log: bool, asgi: bool = False) -> tuple[Any, Any, FakeTransport, Any]:
    import uvloop

    if asgi:
        from bench.apps.asgi_hello import app
        from clusterctl.http.asgi import AsgiServer as Server
    else:
        from clusterctl.http.wsgi import WsgiServer as Server
        from examples.hello import app

    loop = uvloop.new_event_loop()
    access = None
    if access_log:
        from clusterctl.worker.accesslog import AccessLog
        from clusterctl.worker.options import WorkerConfig

        access = AccessLog(loop, WorkerConfig(app="examples.hello:app"), journal=False)
    server = Server(app, loop, access_log=access)
    if ENGINE == "compiled" and not asgi:
        from clusterctl.http import fastlane

        if not fastlane.install(server):
            raise SystemExit(f"--engine compiled: {fastlane.why_not()}")
    proto = server.protocol()
    transport = FakeTransport()
    proto.connection_made(transport)
    return server, proto, transport, access


def drive(scenario: str, n: int, access_log: bool) -> float:
    """Feed about `n` requests through one connection; returns seconds per request.

    `asgi-*` scenarios serve bench/apps/asgi_hello.py: each read is followed by one turn of the loop (the
    app runs in its own task, as in the server), so the loop's own cost per turn is counted too."""
    asgi = scenario.startswith("asgi-")
    data, per = SCENARIOS[scenario]
    server, proto, transport, access = make(access_log, asgi)
    feed = proto.data_received
    reads = max(1, n // per)
    flush = access.flush if access is not None else None
    t0 = time.process_time()
    if scenario.endswith("close"):  # a connection per request
        import asyncio

        new, lost = server.protocol, type(proto).connection_lost

        async def connections() -> FakeTransport:
            for _ in range(reads):
                conn = new()
                t = FakeTransport()
                conn.connection_made(t)
                conn.data_received(data)
                if asgi:
                    await asyncio.sleep(0)
                lost(conn, None)
            return t
        transport = server.loop.run_until_complete(connections())
    elif asgi:
        import asyncio

        async def turns() -> None:
            for i in range(reads):
                feed(data)
                for _ in range(per):
                    await asyncio.sleep(0)
                if flush is not None and i & 63 == 63:
                    flush()
        server.loop.run_until_complete(turns())
    else:
        for i in range(reads):
            feed(data)
            if flush is not None and i & 63 == 63:
                flush()  # what the loop's call_soon would do about once per turn
    dt = time.process_time() - t0
    if flush is not None:
        flush()
    served = reads * per
    if transport.closed != scenario.endswith("close") or server.served != served or not transport.last.startswith(b"HTTP/1.1 "):
        raise SystemExit(f"{scenario}: served {server.served}/{served}, closed={transport.closed}, "
                         f"last={transport.last[:60]!r}")
    return dt / served


def callgrind_instructions(scenario: str, n: int, access_log: bool) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
           "--inner", scenario, "--requests", str(n), "--engine", ENGINE] + (["--access-log"] if access_log else [])
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # same dict layouts every run: counts repeat exactly
    err = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stderr
    m = re.search(r"Collected\s*:\s*(\d+)", err)
    if not m:
        raise RuntimeError(err[-2000:])
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scenarios", nargs="*", default=[s for s in SCENARIOS if not s.startswith("asgi-")],
                    help=f"of {', '.join(SCENARIOS)} (asgi-*: the ASGI hello app)")
    ap.add_argument("--access-log", action="store_true", help="also measure with the stdout access log on")
    ap.add_argument("--instructions", action="store_true", help="count instructions/request with callgrind")
    ap.add_argument("--profile", metavar="SCENARIO")
    ap.add_argument("--engine", choices=["python", "compiled"], default="python", help="the WSGI protocol measured")
    ap.add_argument("--inner", metavar="SCENARIO", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global ENGINE
    ENGINE = args.engine
    if args.inner:  # run under callgrind: just do the work
        drive(args.inner, args.requests, args.access_log)
        return
    devnull = open(os.devnull, "w")  # noqa: SIM115 - the access log's stdout for the whole run
    sys.stdout.flush()
    real_stdout, sys.stdout = sys.stdout, devnull

    def say(text: str) -> None:
        real_stdout.write(text + "\n")
        real_stdout.flush()

    if args.profile:
        import cProfile
        import pstats

        drive(args.profile, 2000, args.access_log)
        prof = cProfile.Profile()
        prof.runcall(drive, args.profile, args.requests, args.access_log)
        sys.stdout = real_stdout
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    say(f"python {sys.version.split()[0]}, {args.engine} engine, {args.requests} requests x best of {args.repeat}")
    modes = [False, True] if args.access_log else [False]
    for scenario in args.scenarios:
        for log_on in modes:
            drive(scenario, 2000, log_on)  # warm caches
            best = min(drive(scenario, args.requests, log_on) for _ in range(args.repeat))
            line = f"{scenario + (' +access-log' if log_on else ''):24} {best * 1e6:7.2f} us/request"
            line += f"  ({1 / best / 1000:6.1f}k req/s CPU-only)"
            if args.instructions:
                lo, hi = 1000, 6000
                ins = (callgrind_instructions(scenario, hi, log_on)
                       - callgrind_instructions(scenario, lo, log_on)) / (hi - lo)
                line += f"  {ins:9.0f} instructions/request"
            say(line)


if __name__ == "__main__":
    main()
