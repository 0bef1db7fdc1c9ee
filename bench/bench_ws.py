"""WebSocket echo round trips per second: our worker against uvicorn, one server process on one core each.

Every server serves examples/wsecho.py (raw ASGI: `/ws` echoes every message) pinned to core 1 (taskset -c 1,
bench_core.running). Ours runs the real way, through systemd-socket-activate; uvicorn with `--ws websockets` (its
default) and `--ws wsproto` (the library ours uses). Compression is off everywhere.

The load comes from `--clients` processes (default: one per usable core other than the server's), each pinned to
one of those cores and holding `--connections` WebSockets. A single Python client saturated its own core long
before the server's, so its figures measured the client; these clients are also light: a minimal RFC 6455 client
on plain asyncio protocols (handshake checked, masked frames prebuilt, every echo compared with what was sent,
pings answered), one round trip in flight per connection. All clients connect first, then start together; round
trips completing within the same `--duration` window after a `--warmup` are counted and summed. Reported per
server: round trips/s, p50/p99 round-trip latency, how busy the server's core was (near 100%: the server is the
limit, as intended) and how busy the clients' cores were (near 100%: the clients are the limit, add cores).
Servers are measured in interleaved rounds; the best round counts. Loopback only, every step bounded in time.

The measured part holds /tmp/clusterctl-bench.lock (flock, as bench/run.py), waiting while another benchmark
holds it; do not wrap this script in flock(1) too (it would wait for itself). A quiet machine with 4+ cores:

    .venv/bin/python bench/bench_ws.py [--duration 5] [--rounds 2] [--clients N] [--connections 16] [--size 64]

Prints a table and the ratios ours/uvicorn, and writes raw JSON to bench/out/ws-TIME.json (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import BIN, PY, REPO, free_port, running

APP = "examples.wsecho:app"
SERVER_CORE = 1  # bench_core.running pins the server here
QUANTILES = 1000  # latency points each client reports (its distribution, merged by weight in the parent)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def servers(port: int) -> dict[str, list[str]]:
    ssa = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"
    uvicorn = [str(BIN / "uvicorn"), "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
               "--log-level", "warning", "--loop", "uvloop", "--http", "httptools", "--ws-per-message-deflate", "false"]
    return {
        "clusterctl": [ssa, "-l", f"127.0.0.1:{port}", "-EPYTHONPATH=" + str(REPO), PY, "-m", "clusterctl.worker",
                       "--app", APP, "--no-access-log", "--no-ws-per-message-deflate"],
        "uvicorn": [*uvicorn, "--ws", "websockets", APP],
        "uvicorn-wsproto": [*uvicorn, "--ws", "wsproto", APP],
    }


# -- the client process ---------------------------------------------------------------------------------------

def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set; clients must mask), built once per payload, not per message."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = (key * (n // 4 + 1))[:n]
    return head + key + (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


class Echo(asyncio.Protocol):
    """One WebSocket: the handshake, then send, await the echo, send again until the window ends."""

    def __init__(self, port: int, payload: bytes, run: dict[str, Any]) -> None:
        self.key = base64.b64encode(os.urandom(16))
        self.request = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, self.key))
        self.payload = payload
        self.frame = masked_frame(0x2, payload)
        self.run = run  # shared by the process's connections: window, counts, latencies
        self.buf = bytearray()
        self.upgraded = False
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.sent_at = 0.0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[:end + 4]
            accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest()).lower()
            if not head.startswith(b"http/1.1 101") or accept not in head:
                self._fail(f"bad handshake: {head[:200]!r}")
                return
            self.upgraded = True
            self.opened.set_result(None)
        while len(buf) >= 2:
            n, off = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                return
            opcode = buf[0] & 0x0F
            body = bytes(buf[off:off + n])
            del buf[:off + n]
            if opcode == 0x9:
                self.transport.write(masked_frame(0xA, body))  # the server's keepalive ping
            elif opcode == 0x8:
                self._fail("the server closed the WebSocket")
                return
            elif opcode in (0x1, 0x2):
                if body != self.payload:
                    self._fail("the echo differs from the message")
                    return
                self._echoed()

    def send(self) -> None:
        self.sent_at = time.monotonic()
        self.transport.write(self.frame)

    def _echoed(self) -> None:
        now = time.monotonic()
        run = self.run
        if run["start"] <= now < run["end"]:
            run["count"] += 1
            run["latency"].append(now - self.sent_at)
        if now < run["end"]:
            self.send()
        elif not self.done.done():
            self.done.set_result(None)

    def _fail(self, why: str) -> None:
        self.run["errors"].append(why)
        for fut in (self.opened, self.done):
            if not fut.done():
                fut.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._fail(f"connection lost: {exc}")


async def client(port: int, connections: int, size: int) -> dict[str, Any]:
    """Open every connection, say `ready`, wait for `go START END` (time.monotonic: one clock for all processes
    on a machine), echo until END; return the counts within [START, END)."""
    loop = asyncio.get_running_loop()
    payload = os.urandom(size)
    run: dict[str, Any] = {"start": float("inf"), "end": float("inf"), "count": 0, "latency": [], "errors": []}
    conns = []
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: Echo(port, payload, run), "127.0.0.1", port)
        conns.append(proto)
        await asyncio.wait_for(proto.opened, 10)
    print("ready", flush=True)
    go = (await loop.run_in_executor(None, sys.stdin.readline)).split()
    run["start"], run["end"] = float(go[1]), float(go[2])
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for proto in conns:
        if not proto.done.done():
            proto.send()
    await asyncio.wait_for(asyncio.gather(*(p.done for p in conns)), run["end"] - time.monotonic() + 10)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for proto in conns:
        proto.transport.abort()
    lat = sorted(run["latency"])
    points = [lat[min(len(lat) - 1, int(i * len(lat) / QUANTILES))] for i in range(QUANTILES)] if lat else []
    return {"round_trips": run["count"], "latency_points": points, "errors": run["errors"][:5],
            "cpu_s": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime}


def client_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(client(args.port, args.connections, args.size))), flush=True)


# -- the parent ------------------------------------------------------------------------------------------------

def core_busy(core: int) -> tuple[int, int]:
    """(busy, total) jiffies of one core from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                return sum(v) - v[3] - v[4], sum(v)  # idle and iowait are not busy
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def busy_share(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> float:
    busy = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    total = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return busy / total if total else 0.0


def weighted_quantile(runs: list[dict[str, Any]], q: float) -> float | None:
    """The q-quantile of all round trips: each client's points stand for round_trips/len(points) each."""
    pts = sorted((p, r["round_trips"] / len(r["latency_points"])) for r in runs if r["latency_points"] for p in
                 r["latency_points"])
    total = sum(w for _, w in pts)
    acc = 0.0
    for p, w in pts:
        acc += w
        if acc >= q * total:
            return p
    return None


def read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    """One line of a client's stdout, or RuntimeError at the deadline (a stuck client never hangs the run)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"client {proc.pid}: no answer in time (exit {proc.poll()})")
    return line.strip()


def measure(port: int, args: argparse.Namespace, cores: list[int]) -> dict[str, Any]:
    """Start the clients (one pinned per core, round robin), let them run together, sum what they counted."""
    cmd = [PY, __file__, "--client", "--port", str(port), "--connections", str(args.connections),
           "--size", str(args.size)]
    procs = [subprocess.Popen(["taskset", "-c", str(cores[i % len(cores)]), *cmd], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for i in range(args.clients)]
    try:
        setup = time.monotonic() + 30
        for p in procs:
            if read_line(p, setup) != "ready":
                raise RuntimeError(f"client {p.pid} did not connect")
        start = time.monotonic() + 0.2 + args.warmup
        end = start + args.duration
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"go {start} {end}\n")
            p.stdin.flush()
        time.sleep(max(0.0, start - time.monotonic()))
        before = [core_busy(c) for c in (SERVER_CORE, *cores)]
        time.sleep(max(0.0, end - time.monotonic()))
        after = [core_busy(c) for c in (SERVER_CORE, *cores)]
        runs = [json.loads(read_line(p, end + 30)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    n = sum(r["round_trips"] for r in runs)
    p50, p99 = weighted_quantile(runs, 0.5), weighted_quantile(runs, 0.99)
    return {"round_trips": n, "seconds": args.duration, "rate": n / args.duration,
            "p50_ms": None if p50 is None else p50 * 1e3, "p99_ms": None if p99 is None else p99 * 1e3,
            "server_core_busy": busy_share(before[:1], after[:1]), "client_cores_busy": busy_share(before[1:], after[1:]),
            "client_cpu_s": sum(r["cpu_s"] for r in runs), "errors": [e for r in runs for e in r["errors"]]}


def main() -> None:
    usable = sorted(os.sched_getaffinity(0))
    others = [c for c in usable if c != SERVER_CORE] or usable[:1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per server and round")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the measured window")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=len(others),
                    help=f"client processes (default: one per core but the server's, here {len(others)})")
    ap.add_argument("--connections", type=int, default=16, help="WebSockets per client process")
    ap.add_argument("--size", type=int, default=64, help="message size in bytes")
    ap.add_argument("--only", nargs="*", default=None, help="servers to measure (default: all installed)")
    ap.add_argument("--no-lock", action="store_true",
                    help="do not take /tmp/clusterctl-bench.lock (never for figures you report)")
    ap.add_argument("--output", type=Path, default=None, help="JSON file (default bench/out/ws-TIME.json)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args)
        return
    from run import bench_lock  # bench/run.py's flock; here, not at the top: the clients do not need it
    if SERVER_CORE not in usable:
        sys.exit(f"bench_ws.py pins the server to core {SERVER_CORE}, which this process may not use ({usable})")
    if SERVER_CORE in others:
        print(f"warning: one usable core: clients share core {SERVER_CORE} with the server", flush=True)
    print(f"server on core {SERVER_CORE}; {args.clients} client process(es) x {args.connections} WebSockets on "
          f"core(s) {','.join(map(str, others))}", flush=True)
    raw: dict[str, list[dict[str, Any]]] = {}
    with bench_lock(not args.no_lock):
        for rnd in range(args.rounds):
            for name in servers(0):
                if args.only and name not in args.only:
                    continue
                port = free_port()
                argv = servers(port)[name]
                if not Path(argv[0]).exists():
                    print(f"round {rnd + 1} {name:16} skipped: {argv[0]} not installed (pip install '.[bench]')")
                    continue
                with running(argv, port):
                    r = measure(port, args, others)
                raw.setdefault(name, []).append(r)
                print(f"round {rnd + 1} {name:16} {r['rate']:9.0f} round trips/s  p50 {r['p50_ms'] or 0:6.2f} ms  "
                      f"p99 {r['p99_ms'] or 0:6.2f} ms  server core {r['server_core_busy']:4.0%}  "
                      f"client cores {r['client_cores_busy']:4.0%}" + (f"  ERRORS {r['errors']}" if r["errors"] else ""),
                      flush=True)
    best = {n: max(rs, key=lambda r: r["rate"]) for n, rs in raw.items()}
    print(f"\nbest of {args.rounds} round(s):")
    for n, r in best.items():
        print(f"  {n:16} {r['rate']:9.0f}/s  (server core {r['server_core_busy']:.0%} busy, client cores "
              f"{r['client_cores_busy']:.0%})")
        if r["client_cores_busy"] > 0.9:
            print(f"  {'':16} the clients' cores were saturated: this figure may be the clients' limit")
    ratios = {peer: best["clusterctl"]["rate"] / r["rate"] for peer, r in best.items()
              if peer != "clusterctl" and "clusterctl" in best and r["rate"]}
    for peer, ratio in ratios.items():
        print(f"  ours / {peer}: {ratio:.2f}x")
    path = args.output
    if path is None:
        out = REPO / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"ws-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                "raw": raw, "best": {n: r["rate"] for n, r in best.items()}, "ratios": ratios},
                               indent=2))
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
