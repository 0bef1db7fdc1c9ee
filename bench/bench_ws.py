"""WebSocket echo round trips per second: our worker against uvicorn, one process each, same app.

Both serve examples/wsecho.py (raw ASGI: `/ws` echoes every message), pinned to core 1 (taskset -c 1);
the client is a Python process on core 0 (`websockets`, compression off) holding `--connections`
WebSockets, each sending a message and awaiting its echo in a loop for `--duration` seconds (also bounded
by `--max-messages` per connection). Ours runs the real way, through systemd-socket-activate; uvicorn
with its own socket, `--ws websockets` (its default) and `--ws wsproto` (the same library as ours).
Servers are measured in interleaved rounds, the best round counts. A Python client may itself be the
bottleneck: compare only within one run, and read the client's CPU time in the JSON.

    .venv/bin/python bench/bench_ws.py [--duration 5] [--rounds 2] [--connections 20] [--size 64]

Prints round trips/s and the ratio ours/uvicorn, and writes raw JSON to bench/out/ws-TIME.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import BIN, PY, REPO, free_port, running

APP = "examples.wsecho:app"


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


async def clients(port: int, conns: int, duration: float, max_messages: int, size: int) -> int:
    from websockets.asyncio.client import connect

    payload = b"x" * size
    deadline = time.monotonic() + duration

    async def one() -> int:
        n = 0
        async with connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None) as ws:
            while n < max_messages and time.monotonic() < deadline:
                await ws.send(payload)
                await ws.recv()
                n += 1
        return n

    return sum(await asyncio.gather(*(one() for _ in range(conns))))


def client_main(args: argparse.Namespace) -> None:
    """The client process (core 0): prints one JSON line."""
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    n = asyncio.run(clients(args.port, args.connections, args.duration, args.max_messages, args.size))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - t0
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    print(json.dumps({"round_trips": n, "seconds": wall, "rate": n / wall, "client_cpu_s": cpu}))


def run_client(port: int, args: argparse.Namespace, duration: float) -> dict[str, float]:
    cmd = ["taskset", "-c", "0", PY, __file__, "--client", "--port", str(port), "--duration", str(duration),
           "--connections", str(args.connections), "--max-messages", str(args.max_messages), "--size", str(args.size)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(argv: list[str], port: int, args: argparse.Namespace) -> dict[str, float]:
    with running(argv, port):
        run_client(port, args, min(1.0, args.duration))  # warm-up
        return run_client(port, args, args.duration)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--max-messages", type=int, default=1_000_000, help="per connection and round")
    ap.add_argument("--size", type=int, default=64, help="message size in bytes")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args)
        return
    raw: dict[str, list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for name in servers(0):
            if args.only and name not in args.only:
                continue
            port = free_port()
            r = measure(servers(port)[name], port, args)
            raw.setdefault(name, []).append(r)
            print(f"round {rnd + 1} {name:16} {r['rate']:9.0f} round trips/s  (client cpu {r['client_cpu_s']:.1f}s"
                  f" of {r['seconds']:.1f}s)", flush=True)
    best = {n: max(r["rate"] for r in rs) for n, rs in raw.items()}
    ratios = {peer: best["clusterctl"] / rate for peer, rate in best.items() if peer != "clusterctl" and "clusterctl" in best}
    print(f"\nbest of {args.rounds} round(s): " + ", ".join(f"{n} {v:.0f}/s" for n, v in best.items()))
    for peer, ratio in ratios.items():
        print(f"  ours / {peer}: {ratio:.2f}x")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ws-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "raw": raw, "best": best, "ratios": ratios}, indent=2))
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
