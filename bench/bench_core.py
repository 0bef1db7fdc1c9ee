"""One worker on one core against its peers: hello world, keep-alive and Connection: close.

Each server is pinned to core 1 (taskset -c 1), wrk to core 0, loopback only, bounded durations, and
all servers are measured in the same run in interleaved rounds (these machines are noisy: compare only
within one run). Ours is started the real way, through systemd-socket-activate (fd hand-over).

    .venv/bin/python bench/bench_core.py [--duration 5] [--rounds 2] [--connections 50]
    .venv/bin/python bench/bench_core.py --baseline ../before --only clusterctl clusterctl-baseline granian

`--baseline DIR` adds "clusterctl-baseline": the same worker from another checkout (e.g. `git worktree add
../before HEAD~1`), so a change is measured before and after in one run.

Prints a table (medians of the rounds) with the ratios to the targets of issues 3 and 21 and writes raw JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent
NODE_APP = ("require('http').createServer((q,s)=>{s.writeHead(200,{'Content-Type':'text/plain'});"
            "s.end('Hello, world!\\n')}).listen(+process.argv[1],'127.0.0.1')")

BJOERN_APP = "import sys, bjoern; from bench.apps.hello_cl import app; bjoern.run(app, '127.0.0.1', int(sys.argv[1]))"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_DIR = REPO / "bench" / "out" / "nginx"
# One worker answering like examples/hello.py's "/" (same body and Content-Type), logging nothing.
NGINX_CONF = """daemon off; master_process off; worker_processes 1; error_log /dev/null crit; pid nginx.pid;
events {{ worker_connections 4096; }}
http {{ access_log off; server_tokens off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; return 200 "Hello, world!\\n"; }} }} }}
"""
# How to get the peers that are not in the bench extra; a missing one is skipped with this note.
INSTALL = {"bjoern": "apt-get install libev-dev; pip install bjoern", "nginx": "apt-get install nginx-light",
           "node20": "apt-get install nodejs"}


def nginx_conf(port: int) -> Path:
    NGINX_DIR.mkdir(parents=True, exist_ok=True)
    conf = NGINX_DIR / f"nginx-{port}.conf"
    conf.write_text(NGINX_CONF.format(port=port))
    return conf


def missing(name: str, argv: list[str]) -> str | None:
    """Why `name` cannot run here (and how to install it), or None."""
    if not Path(argv[0]).exists():
        how = INSTALL.get(name, "pip install '.[bench]'")
        return f"{argv[0]} not installed ({how})"
    if name == "bjoern" and importlib.util.find_spec("bjoern") is None:
        return f"bjoern not installed in this venv ({INSTALL[name]})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(port: int, extra: list[str], baseline: str | None = None) -> dict[str, list[str]]:
    ssa = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"
    worker = [ssa, "-l", f"127.0.0.1:{port}", "-EPYTHONPATH=" + str(REPO), PY, "-m", "clusterctl.worker",
              "--app", "examples.hello:app", "--no-access-log", *extra]
    # issue 21: the worker on the pure-Python engine, and on the compiled fast lane (clusterctl/http/_fast.c)
    # in front of it (what --engine auto, the default, picks where the lane was built)
    ours = {"clusterctl": [*worker, "--engine", "python"], "clusterctl-compiled": [*worker, "--engine", "compiled"]}
    if baseline:
        # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: the other checkout's
        # worker must also run from there (env -C), or this checkout's clusterctl is what gets measured.
        base = str(Path(baseline).resolve())
        ours["clusterctl-baseline"] = [ssa, "-l", f"127.0.0.1:{port}", "-EPYTHONPATH=" + base, "env", "-C", base,
                                       PY, "-m", "clusterctl.worker", "--app", "examples.hello:app", "--no-access-log",
                                       *extra]
    return {
        **ours,
        "granian": [str(BIN / "granian"), "--interface", "wsgi", "--workers", "1", "--host", "127.0.0.1",
                    "--port", str(port), "--no-ws", "examples.hello:app"],
        "gunicorn-sync": [str(BIN / "gunicorn"), "-w", "1", "-b", f"127.0.0.1:{port}", "--log-level",
                          "warning", "examples.hello:app"],
        "node20": ["/usr/bin/node", "-e", NODE_APP, str(port)],
        # C peers (issue 21): bjoern (libev, C HTTP parser, WSGI) and nginx answering from its config
        "bjoern": [PY, "-c", BJOERN_APP, str(port)],
        "nginx": [NGINX, "-p", str(NGINX_DIR), "-c", str(nginx_conf(port)), "-e", "/dev/null"],
        # ASGI (issue 10): the same hello response from an ASGI app
        "clusterctl-asgi": [ssa, "-l", f"127.0.0.1:{port}", "-EPYTHONPATH=" + str(REPO), PY, "-m",
                            "clusterctl.worker", "--app", "bench.apps.asgi_hello:app", "--no-access-log", *extra],
        "uvicorn": [str(BIN / "uvicorn"), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                    "--log-level", "warning", "--host", "127.0.0.1", "--port", str(port), "bench.apps.asgi_hello:app"],
        "granian-asgi": [str(BIN / "granian"), "--interface", "asgi", "--workers", "1", "--host", "127.0.0.1",
                         "--port", str(port), "--no-ws", "bench.apps.asgi_hello:app"],
    }


def wait_ready(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                s.settimeout(5)
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not answer")


def wrk(port: int, duration: int, conns: int, close: bool) -> float:
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{duration}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run([*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=duration + 30, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(out)
    return float(m.group(1))


@contextlib.contextmanager
def running(argv: list[str], port: int) -> Iterator[None]:
    """A server pinned to core 1, answering on `port` for the block, then killed with all it forked."""
    proc = subprocess.Popen(["taskset", "-c", "1", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(port)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and any children it forked
        proc.wait(10)


def measure(name: str, argv: list[str], port: int, args: argparse.Namespace) -> dict[str, float]:
    with running(argv, port):
        wrk(port, 1, args.connections, False)  # warm-up
        return {"keepalive": wrk(port, args.duration, args.connections, False),
                "close": wrk(port, args.duration, args.connections, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--worker-args", default="", help="extra flags for our worker")
    ap.add_argument("--baseline", metavar="DIR", help="also measure the worker of another checkout")
    args = ap.parse_args()
    raw: dict[str, list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        port = free_port()
        for name, argv in servers(port, args.worker_args.split(), args.baseline).items():
            if args.only and name not in args.only:
                continue
            port = free_port()
            argv = servers(port, args.worker_args.split(), args.baseline)[name]
            why = missing(name, argv)
            if why:
                print(f"round {rnd + 1} {name:19} skipped: {why}", flush=True)
                continue
            r = measure(name, argv, port, args)
            raw.setdefault(name, []).append(r)
            print(f"round {rnd + 1} {name:19} keep-alive {r['keepalive']:9.0f}  close {r['close']:9.0f}",
                  flush=True)
    # Medians of the rounds (issue 21's targets): one lucky or unlucky round does not decide a ratio.
    median = {n: {k: statistics.median(r[k] for r in rs) for k in ("keepalive", "close")} for n, rs in raw.items()}
    best = {n: {k: max(r[k] for r in rs) for k in ("keepalive", "close")} for n, rs in raw.items()}  # bench/run.py's
    print(f"\n{'server':19} {'keep-alive':>11} {'close':>9}   (median of {args.rounds} rounds, req/s)")
    for n, b in median.items():
        print(f"{n:19} {b['keepalive']:11.0f} {b['close']:9.0f}")
    targets = {("clusterctl", "node20", "keepalive"): 1.25, ("clusterctl", "granian", "keepalive"): 1.3,
               ("clusterctl", "gunicorn-sync", "keepalive"): 10.0, ("clusterctl", "node20", "close"): 1.0,
               ("clusterctl-asgi", "uvicorn", "keepalive"): 1.5, ("clusterctl-asgi", "granian-asgi", "keepalive"): 1.1,
               ("clusterctl", "bjoern", "keepalive"): 1.0, ("clusterctl", "bjoern", "close"): 1.0,
               ("clusterctl", "granian", "close"): 0.85,
               ("clusterctl-compiled", "bjoern", "keepalive"): 1.0, ("clusterctl-compiled", "bjoern", "close"): 1.0,
               ("clusterctl-compiled", "granian", "keepalive"): 1.3, ("clusterctl-compiled", "granian", "close"): 0.85,
               ("clusterctl", "clusterctl-baseline", "keepalive"): 0.95, ("clusterctl", "clusterctl-baseline", "close"): 0.95}
    print("\nratios (ours / peer):")
    for (us, peer, mode), target in targets.items():
        if us in median and peer in median:
            ratio = median[us][mode] / median[peer][mode]
            print(f"  {us:19} {mode:9} vs {peer:14} {ratio:6.2f}x  (target >= {target}x) "
                  f"{'ok' if ratio >= target else 'MISSED'}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"core-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "raw": raw, "best": best, "median": median}, indent=2))
    print(f"\nraw: {path}")


if __name__ == "__main__":
    main()
