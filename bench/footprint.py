"""Idle memory of one worker, reproducibly, without systemd: VmRSS, PSS and their parts after a few requests.

    .venv/bin/python bench/footprint.py                      # socket-activated, the way a unit starts it
    .venv/bin/python bench/footprint.py --mode bind          # python -m clusterctl.worker --bind 127.0.0.1:0
    .venv/bin/python bench/footprint.py --modules            # also list what the worker imported
    .venv/bin/python bench/footprint.py -- --threads 4       # extra worker options after --

`--mode socket-activate` (default) runs `systemd-socket-activate -l 127.0.0.1:PORT python -m clusterctl.worker
--app APP --name footprint --instance 1` with a NOTIFY_SOCKET this script reads (it waits for READY=1) and a
RUNTIME_DIRECTORY (messaging on), as under the generated units; what it cannot give is journald (the
access log goes to stdout here) and the unit's sandboxing. `bench/run.py --only footprint` measures the
real thing inside a clusterctl sandbox. No load: `--requests` sequential requests on fresh connections,
then `--settle` seconds idle, then /proc/PID/status and /proc/PID/smaps_rollup. Memory only, no timing.

The interpreter's bytecode cache matters: a worker under ProtectSystem=strict cannot write __pycache__, so
modules without a cached .pyc are compiled from source on every start (about 2 MB more resident). The
script says whether clusterctl has one (`python -m compileall clusterctl` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from loadgen import request  # noqa: E402  (one GET on a new connection)

SSA = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> bytes:
    status, body = request(port, path)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status}")
    return body


def memory(pid: int) -> dict[str, float]:
    """MB: VmRSS with its anonymous and file-backed parts, PSS with its anonymous part, private pages."""
    status = Path(f"/proc/{pid}/status").read_text()
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()

    def kb(pattern: str, text: str) -> float:
        m = re.search(pattern + r":\s+(\d+) kB", text, re.M)
        return round(int(m.group(1)) / 1024, 1) if m else float("nan")

    return {"vmrss_mb": kb("^VmRSS", status), "rss_anon_mb": kb("^RssAnon", status),
            "rss_file_mb": kb("^RssFile", status), "pss_mb": kb("^Pss", rollup), "pss_anon_mb": kb("^Pss_Anon", rollup),
            "private_mb": round(kb("^Private_Clean", rollup) + kb("^Private_Dirty", rollup), 1),
            "threads": int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))}  # type: ignore[union-attr]


def bytecode_cached(python: str) -> bool:
    """Whether clusterctl.http.wsgi would load from a .pyc (what a read-only unit needs)."""
    code = "import importlib.util as u, os; s = u.find_spec('clusterctl.http.wsgi'); print(os.path.exists(s.cached))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() == "True"


class Run:
    """One worker started the chosen way; `pid`, `port`; stopped (SIGTERM, then SIGKILL) by stop()."""

    def __init__(self, python: str, app: str, mode: str, extra: list[str], tmp: Path) -> None:
        cmd = [python, "-m", "clusterctl.worker", "--app", app, *extra]
        # Like a unit's worker (ProtectSystem=strict), it never writes a bytecode cache: what it finds is
        # what it gets, and measuring leaves the tree as it was.
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
        self.notify: socket.socket | None = None
        if mode == "socket-activate":
            self.port = _free_port()
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(str(tmp / "notify"))
            (tmp / "run").mkdir(mode=0o700)
            wenv = {"NOTIFY_SOCKET": str(tmp / "notify"), "RUNTIME_DIRECTORY": str(tmp / "run"),
                    "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}  # the activator passes only these
            cmd = [SSA, "-l", f"127.0.0.1:{self.port}", *[f"-E{k}={v}" for k, v in wenv.items()],
                   *cmd, "--name", "footprint", "--instance", "1"]
        else:
            cmd += ["--bind", "127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid  # systemd-socket-activate execs the worker: same pid
        if mode == "socket-activate":
            self._wait_ready()
        else:
            self.port = self._port_from_log()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        # systemd-socket-activate starts the worker on the first connection; it waits in the queue
        while True:
            try:
                first = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with first:
            while True:
                self.notify.settimeout(max(0.01, deadline - time.monotonic()))
                if b"READY=1" in self.notify.recv(4096):
                    break
            first.sendall(b"GET / HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n")
            while first.recv(65536):
                pass

    def _port_from_log(self) -> int:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # "INFO clusterctl.worker: serving APP on 127.0.0.1:PORT (pid N)"
            m = re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", line)
            if m:
                return int(m.group(1))
        raise RuntimeError(f"the worker exited ({self.proc.wait()}) before serving")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.notify is not None:
            self.notify.close()


def measure(python: str = sys.executable, app: str = "examples.hello:app", mode: str = "socket-activate",
            extra: list[str] | None = None, requests: int = 20, settle: float = 1.0,
            modules: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="clusterctl-footprint-") as d:
        run = Run(python, "bench.apps.modules:app" if modules else app, mode, list(extra or ()), Path(d))
        try:
            for _ in range(requests):
                _get(run.port, "/")
            mods = _get(run.port, "/modules").decode().split() if modules else None
            main_names = _get(run.port, "/main").decode().split() if modules else None
            time.sleep(settle)
            result: dict[str, Any] = {"mode": mode, "app": app, "requests": requests, **memory(run.pid)}
        finally:
            run.stop()
    if mods is not None:
        result["modules"] = mods
        result["main_names"] = main_names
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("socket-activate", "bind"), default="socket-activate")
    ap.add_argument("--app", default="examples.hello:app")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--requests", type=int, default=20, help="requests before measuring (default 20)")
    ap.add_argument("--settle", type=float, default=1.0, help="idle seconds before measuring (default 1)")
    ap.add_argument("--runs", type=int, default=3, help="workers started one after another (default 3)")
    ap.add_argument("--modules", action="store_true",
                    help="serve bench.apps.modules:app (hello + /modules) and print the imported modules")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("extra", nargs="*", help="worker options, after --")
    args = ap.parse_args()
    cached = bytecode_cached(args.python)
    results = [measure(args.python, args.app, args.mode, args.extra, args.requests, args.settle, args.modules)
               for _ in range(args.runs)]
    if args.json:
        print(json.dumps({"bytecode_cached": cached, "runs": results}, indent=1))
        return 0
    print(f"{args.app}, {args.mode}, {args.requests} requests, {args.settle:g} s idle; "
          f"clusterctl bytecode cache: {'yes' if cached else 'NO (compiled from source at every start)'}")
    for r in results:
        print("  VmRSS {vmrss_mb} MB (anon {rss_anon_mb}, file {rss_file_mb})  PSS {pss_mb} MB (anon {pss_anon_mb})  "
              "private {private_mb} MB  threads {threads}".format(**r))
    if args.modules:
        print(f"  {len(results[-1]['modules'])} modules: {' '.join(results[-1]['modules'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
