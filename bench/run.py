"""The benchmark suite of issue 6: clusterctl side by side with its peers, in one command.

    .venv/bin/python bench/run.py              # full run (~10 min on 2 cores), or `make bench`
    .venv/bin/python bench/run.py --quick      # seconds-long loads: checks the plumbing, not the speed

Sections (each side by side with the peers, reported as ratios):
  core          one worker on one core, hello world: bench/bench_core.py (owned by the engine's work), called as is
  scaling       a ~5 ms pure-Python handler, 1 worker vs N (N = usable cores): clusterctl under real systemd in a
                sandbox, gunicorn -w N, Node cluster with N workers, PM2 -i max; target N-worker >= 0.95 x N x 1-worker
  fairness      requests per worker (status --json counters and X-Pid counts), coefficient of variation, both layouts
  availability  steady Connection: close load while rolling reload / restart 'NAME@*' / kill -9 / scale N->2N->N;
                against pm2 reload and gunicorn's HUP; failed requests and p50/p99/max during the event vs steady
  footprint     RSS per idle worker and the time from `systemctl start NAME.target` to every instance READY

Real runs hold /tmp/clusterctl-bench.lock (flock) so they never overlap another engineer's benchmark. Loads
target loopback (the host's, or the sandbox's own) only and stop by themselves. Raw results: bench/out/*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterctl import proc
from clusterctl.control import generate as gen
from clusterctl.control import ops
from clusterctl.control import sandbox as sb
from clusterctl.control.cores import usable_cpus
from clusterctl.control.plan import build_plan, readable_by_anyone
from clusterctl.control.systemd import Systemd
from clusterctl.errors import ClusterctlError

REPO = Path(__file__).resolve().parent.parent

PY = sys.executable
BIN = Path(PY).parent
BENCH = REPO / "bench"
OUT = BENCH / "out"
LUA = BENCH / "report.lua"
LOCK = "/tmp/clusterctl-bench.lock"
NODE = "/usr/bin/node"
PM2 = BENCH / "node_modules" / ".bin" / "pm2"
APP = "bench.apps.work:app"
SECTIONS = ("core", "scaling", "fairness", "availability", "footprint")


def log(msg: str) -> None:
    print(msg, flush=True)


def loadavg() -> str:
    """The machine is shared with other engineers' test runs: every section records how busy it was."""
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cv(values: list[int]) -> float | None:
    """Coefficient of variation (stdev / mean) of per-worker request counts: 0 is a perfectly even spread."""
    if len(values) < 2 or not sum(values):
        return None
    return round(statistics.pstdev(values) / statistics.mean(values), 3)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


# --- load: wrk with bench/report.lua ------------------------------------------------------------------

def wrk(port: int, path: str, seconds: float, conns: int, *, close: bool = True, sandbox: str | None = None,
        pids: bool = True) -> dict[str, Any]:
    """A closed-loop wrk run (as fast as the server answers); report.lua prints one JSON line."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(LUA),
            f"http://127.0.0.1:{port}{path}"]
    env = dict(os.environ, BENCH_CLOSE="1" if close else "0", BENCH_PIDS="1" if pids else "0")
    timeout = seconds + 60
    r = sb.netexec(sandbox, argv, env=env, timeout=timeout) if sandbox else proc.run(argv, env=env, timeout=timeout)
    m = re.search(r"^BENCH_JSON (.*)$", r.stdout, re.M)
    if not m:
        raise ClusterctlError(f"wrk printed no result:\n{r.stdout}\n{r.stderr}", "check bench/report.lua")
    res = json.loads(m.group(1))
    res["rps"] = round(res["requests"] / (res["duration_us"] / 1e6), 1)
    res["errors"] = sum(res[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    pm = re.search(r"^BENCH_PIDS (.*)$", r.stdout, re.M)
    res["per_pid"] = json.loads(pm.group(1)) if pm else {}
    return res


# --- load: a paced Python client that times every request ------------------------------------------------

@dataclass
class Sample:
    t: float  # monotonic start
    latency: float
    ok: bool
    pid: str = ""
    error: str = ""


@dataclass
class Pacer:
    """Steady Connection: close load (a new connection per request, so nothing lost hides behind a retry),
    paced at `rate` req/s over `threads` client threads, inside a sandbox's network namespace or on the host."""

    port: int
    sandbox: str | None = None
    rate: float = 200.0
    threads: int = 4
    max_seconds: float = 120.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _one(self) -> Sample:
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError as e:
            return Sample(t0, time.monotonic() - t0, False, error=f"{type(e).__name__}: {e}")
        dt = time.monotonic() - t0
        if not data.startswith(b"HTTP/1.1 200"):
            return Sample(t0, dt, False, error=f"bad response {data[:40]!r}")
        m = re.search(rb"\r\nx-pid: *(\d+)", data, re.I)
        return Sample(t0, dt, True, pid=m.group(1).decode() if m else "")

    def _run(self) -> None:
        interval = self.threads / self.rate
        deadline = time.monotonic() + self.max_seconds
        with sb.netns(self.sandbox) if self.sandbox else contextlib.nullcontext():
            nxt = time.monotonic()
            while not self._stop.is_set() and time.monotonic() < deadline:
                sample = self._one()
                self.samples.append(sample)  # list.append is atomic under the GIL
                nxt += interval
                time.sleep(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> Pacer:
        for k in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True, name=f"pacer-{k}")
            t.start()
            self._threads.append(t)
            time.sleep(1 / self.rate)  # stagger the threads
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Requests that started in [t0, t1): count, failures, latency percentiles in ms."""
        w = [s for s in list(self.samples) if t0 <= s.t < t1]
        lat = [s.latency * 1000 for s in w if s.ok]
        errors = Counter(s.error for s in w if not s.ok)
        return {"requests": len(w), "failed": sum(errors.values()), "errors": dict(errors.most_common(5)),
                "p50_ms": _r(pct(lat, 50)), "p99_ms": _r(pct(lat, 99)), "max_ms": _r(max(lat) if lat else None)}

    def per_pid(self, t0: float, t1: float) -> dict[str, int]:
        return dict(Counter(s.pid for s in list(self.samples) if t0 <= s.t < t1 and s.ok and s.pid))


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# --- processes ----------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of pid (the workers of a gunicorn or Node primary)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_mb(pid: int, root: Path = Path("/")) -> float | None:
    try:
        m = re.search(r"VmRSS:\s+(\d+) kB", (root / f"proc/{pid}/status").read_text())
    except OSError:
        return None
    return round(int(m.group(1)) / 1024, 1) if m else None


def pss_mb(pid: int, root: Path = Path("/")) -> float | None:
    """Proportional set size: shared library pages split between the processes that map them."""
    try:
        m = re.search(r"^Pss:\s+(\d+) kB", (root / f"proc/{pid}/smaps_rollup").read_text(), re.M)
    except OSError:
        return None
    return round(int(m.group(1)) / 1024, 1) if m else None


def wait_http(port: int, sandbox: str | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sb.netns(sandbox) if sandbox else contextlib.nullcontext(), \
                    socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                s.settimeout(5)
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.05)
    raise ClusterctlError(f"nothing answered on port {port} within {timeout:g}s", "")


class Spawned:
    """A peer server we started: its own session, so killpg reaches exactly it and what it forked."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)

    def __enter__(self) -> Spawned:
        try:
            wait_http(self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait(10)


def pm2_version() -> str:
    """From its package.json: `pm2 --version` would start a daemon under ~/.pm2."""
    pkg = BENCH / "node_modules" / "pm2" / "package.json"
    return json.loads(pkg.read_text())["version"] if pkg.is_file() else "not installed"


class Pm2:
    """PM2 with a private PM2_HOME; its daemon is killed by its own PID at the end."""

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="clusterctl-bench-pm2-")
        self.env = dict(os.environ, PM2_HOME=self.home, PM2_DISCRETE_MODE="true")

    def __call__(self, *args: str, extra_env: dict[str, str] | None = None, timeout: float = 120) -> str:
        env = dict(self.env, **(extra_env or {}))
        return proc.run([str(PM2), *args], env=env, timeout=timeout, cwd=str(REPO)).stdout

    def start(self, instances: str, port: int, env: dict[str, str]) -> list[int]:
        self("start", str(BENCH / "apps" / "server.js"), "--name", "bench", "-i", instances,
             extra_env=dict(env, PORT=str(port)))
        wait_http(port)
        return self.pids()

    def pids(self) -> list[int]:
        return [int(a["pid"]) for a in json.loads(self("jlist") or "[]") if a.get("pid")]

    def close(self) -> None:
        pidfile = Path(self.home) / "pm2.pid"
        daemon = int(pidfile.read_text()) if pidfile.is_file() else None
        with contextlib.suppress(Exception):
            self("kill", timeout=30)
        if daemon:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)


# --- clusterctl in the sandbox --------------------------------------------------------------------------

def worker_user() -> str | None:
    """DynamicUser= where an unprivileged uid can read python and the repo, else root (a /root venv)."""
    return None if all(readable_by_anyone(p) for p in (PY, str(BENCH / "apps" / "work.py"))) else "root"


@dataclass
class Cluster:
    name: str
    port: int
    balance: str
    sd: Systemd

    @property
    def sandbox(self) -> str:
        assert self.sd.sandbox
        return self.sd.sandbox

    def status(self) -> dict[str, Any]:
        """`clusterctl status NAME --json`, the operator's own view (requests from the runtime's STATUS=)."""
        out = proc.run([PY, "-m", "clusterctl", "status", self.name, "--json", "--sandbox", self.sandbox],
                       timeout=60, cwd=str(REPO)).stdout
        return json.loads(out)

    def requests(self) -> dict[str, int]:
        return {i["instance"]: i["requests"] or 0 for i in self.status()["instances"] if i["state"] == "active"}

    def main_pids(self) -> dict[str, int]:
        rows = self.sd.show(self.sd.list_units(f"{self.name}@*.service"), ("Id", "MainPID", "ActiveState"))
        return {r["Id"]: int(r["MainPID"]) for r in rows if r.get("ActiveState") == "active"}


def install(sandbox: str, name: str, port: int, balance: str, workers: int, app: str, env: dict[str, str],
            tmp: Path, access_log: bool, start: bool = True) -> Cluster:
    plan = build_plan(app=app, name=name, workers=str(workers), listen=[f"127.0.0.1:{port}"], balance=balance,
                      working_dir=str(REPO), python=PY, user=worker_user(),
                      env=[f"{k}={v}" for k, v in env.items()], check=True)
    out = tmp / name
    gen.write(plan, out, force=True)
    if not access_log:  # the peers log no access lines by default; ours would go to journald per request
        unit = out / f"{name}@.service"
        unit.write_text(re.sub(r"^(ExecStart=.*)$", r"\1 --no-access-log", unit.read_text(), count=1, flags=re.M))
    sd = Systemd(sandbox=sandbox)
    ops.install(sd, out, enable=True, start=start, progress=lambda m: None)
    return Cluster(name, port, balance, sd)


# --- the suite --------------------------------------------------------------------------------------------

class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick or args.smoke
        self.smoke: bool = args.smoke  # the test suite's plumbing check: ours only, one of each, 1 s loads
        self.n = args.workers or usable_cpus().workers
        self.secs = args.duration or (1 if self.quick else 10)
        self.res: dict[str, Any] = {"meta": {}, "targets": []}
        self.tmp = Path(tempfile.mkdtemp(prefix="clusterctl-bench-"))
        self.sandbox = f"bench{os.getpid()}"
        peers = not args.smoke and not args.no_peers
        self.have_pm2 = peers and PM2.is_file() and Path(NODE).is_file()
        self.have_node = peers and Path(NODE).is_file()
        self.have_gunicorn = peers and (BIN / "gunicorn").is_file()
        self.layouts = ("shared",) if args.smoke else ("shared", "reuseport")
        self._booted = False

    # helpers
    def target(self, what: str, value: float | None, goal: str, met: bool | None, note: str = "") -> None:
        self.res["targets"].append({"what": what, "value": value, "target": goal, "met": met, "note": note})

    def section(self, key: str, title: str) -> dict[str, Any]:
        log(f"\n== {key}: {title}  ({loadavg()})")
        sec: dict[str, Any] = {"uptime": proc.run(["uptime"]).stdout.strip(), "title": title}
        self.res[key] = sec
        return sec

    def boot(self) -> None:
        if self._booted:
            return
        binds = [sb.Bind(p, p, readonly=True) for p in sorted({str(REPO), sys.prefix, sys.base_prefix})
                 if p not in ("/", "/usr", "/usr/local")]
        seconds = sb.up(self.sandbox, binds, owner=os.getpid())
        self._booted = True
        log(f"sandbox {self.sandbox}: real systemd booted in {seconds:.2f}s; {self.weigh_sandbox()}")

    def weigh_sandbox(self) -> str:
        """Give the sandbox's own cgroup the CPU weight of N host processes.

        The whole sandbox is one cgroup competing with every host process: on a busy machine its N workers
        would share one process's worth of CPU while each peer worker (a plain host process) gets its own.
        Only this sandbox's cgroup changes, and it goes away with the sandbox.
        """
        done = []
        for mp in (sb.state_dir(self.sandbox) / "cgroup-host").read_text().split():
            top = Path(mp) / f"clusterctl-sandbox.{self.sandbox}"
            for knob, value in (("cpu.shares", 1024 * self.n), ("cpu.weight", 100 * self.n)):
                if (top / knob).is_file():
                    (top / knob).write_text(str(value))
                    done.append(f"{knob}={value}")
        self.res["meta"]["sandbox_cpu_weight"] = done
        return "cgroup " + (", ".join(done) or "weight unchanged (no cpu controller)")

    def close(self) -> None:
        if self._booted:
            sb.down(self.sandbox, missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def meta(self) -> None:
        def version(argv: list[str]) -> str:
            with contextlib.suppress(Exception):
                r = proc.run(argv, check=False, timeout=30)
                return (r.stdout or r.stderr).strip().splitlines()[0]
            return "not installed"
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        self.res["meta"] = {
            "command": " ".join([Path(PY).name, *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "quick": self.quick, "smoke": self.smoke, "n": self.n, "cores": usable_cpus().explain(), "seconds_per_run": self.secs,
            "cpu": cpu.group(1) if cpu else platform.processor(), "kernel": platform.release(),
            "uptime_start": proc.run(["uptime"]).stdout.strip(),
            "versions": {"python": platform.python_version(), "clusterctl": version([PY, "-m", "clusterctl", "--version"]),
                         "gunicorn": version([str(BIN / "gunicorn"), "--version"]),
                         "granian": version([str(BIN / "granian"), "--version"]), "node": version([NODE, "--version"]),
                         "pm2": pm2_version(),
                         "wrk": version(["wrk", "-v"]), "systemd": version(["/lib/systemd/systemd", "--version"])}}

    # 1. per core -----------------------------------------------------------------------------------------
    def core(self) -> None:
        sec = self.section("core", "one worker, one core, hello world (bench/bench_core.py)")
        if self.n < 2 and len(os.sched_getaffinity(0)) < 2:
            sec["skipped"] = "bench_core.py pins the server to core 1 and wrk to core 0: needs 2 CPUs"
            return
        argv = [PY, str(BENCH / "bench_core.py"), "--duration", str(self.secs if self.quick else 5),
                "--rounds", "1" if self.quick else "2"]
        if self.quick:
            argv += ["--only", "clusterctl", *(["node20"] if self.have_node and not self.smoke else [])]
        t0 = time.time()
        proc.run(argv, capture=False, timeout=1800, cwd=str(REPO))
        new = sorted((p for p in OUT.glob("core-*.json") if p.stat().st_mtime >= t0 - 1), key=lambda p: p.stat().st_mtime)
        raw = json.loads(new[-1].read_text())
        sec.update(file=str(new[-1].relative_to(REPO)), best=raw["best"])
        ours = raw["best"].get("clusterctl")
        for (peer, mode), goal in {("node20", "keepalive"): 1.25, ("granian", "keepalive"): 1.3,
                                   ("gunicorn-sync", "keepalive"): 10.0, ("node20", "close"): 1.0}.items():
            if ours and peer in raw["best"]:
                ratio = round(ours[mode] / raw["best"][peer][mode], 2)
                sec.setdefault("ratios", {})[f"{mode} vs {peer}"] = ratio
                self.target(f"core {mode} vs {peer}", ratio, f">= {goal}x", ratio >= goal,
                            "server and wrk each own one of the 2 cores")

    # 2 + 3. scaling and fairness ----------------------------------------------------------------------------
    def cpu_env(self) -> tuple[dict[str, str], dict[str, Any]]:
        sys.path.insert(0, str(REPO))  # bench.apps: the same module the workers import
        from bench.apps.work import calibrate

        py_iters = calibrate()
        js_iters = int(proc.run([NODE, str(BENCH / "apps" / "server.js"), "--calibrate"]).stdout) if self.have_node else 0
        env = {"BENCH_CPU_ITERS": str(py_iters), "BENCH_CPU_ITERS_JS": str(js_iters), "PYTHONUNBUFFERED": "1"}
        return env, {"py_iters": py_iters, "js_iters": js_iters, "target_ms": 5}

    def measure(self, port: int, sandbox: str | None = None) -> dict[str, Any]:
        conns = 4 * self.n
        if not self.smoke:
            wrk(port, "/cpu", 1, conns, sandbox=sandbox)  # warm-up
        r = wrk(port, "/cpu", self.secs, conns, sandbox=sandbox)
        r["per_pid_cv"] = cv(list(r["per_pid"].values()))
        log(f"  {r['rps']:8.1f} req/s  p50 {r['p50_us'] / 1000:6.1f} ms  p99 {r['p99_us'] / 1000:6.1f} ms  "
            f"errors {r['errors']}  per worker {sorted(r['per_pid'].values())}")
        return r

    def scaling(self) -> None:
        sec = self.section("scaling", f"~5 ms pure-Python handler, 1 worker vs N={self.n}, wrk Connection: close, "
                           f"{4 * self.n} connections")
        env, cal = self.cpu_env()
        sec["calibration"] = cal
        fair = self.res.setdefault("fairness", {"uptime": sec["uptime"]})
        runs: dict[str, dict[str, Any]] = {}
        self.boot()
        port = 9100
        c = install(self.sandbox, "bcpu", port, "shared", 1, APP, env, self.tmp, self.args.access_log)
        log("clusterctl (shared socket), 1 worker:")
        runs["clusterctl"] = {"1": self.measure(port, self.sandbox)}
        ops.scale(c.sd, c.name, str(self.n), progress=lambda m: None)
        before = c.requests()
        log(f"clusterctl (shared socket), {self.n} workers:")
        runs["clusterctl"]["n"] = r = self.measure(port, self.sandbox)
        time.sleep(1.3)  # STATUS= is sent about once a second
        after = c.requests()
        counts = [after.get(k, 0) - before.get(k, 0) for k in after]
        fair["clusterctl shared"] = {"status_json": counts, "status_cv": cv(counts), "per_pid": r["per_pid"],
                                     "per_pid_cv": r["per_pid_cv"]}
        ops.uninstall(c.sd, c.name, progress=lambda m: None)
        if "reuseport" in self.layouts:
            c = install(self.sandbox, "bcpurp", port + 1, "reuseport", self.n, APP, env, self.tmp, self.args.access_log)
            before = c.requests()
            log(f"clusterctl (reuseport sockets), {self.n} workers:")
            runs["clusterctl reuseport"] = {"n": (r := self.measure(port + 1, self.sandbox))}
            time.sleep(1.3)
            after = c.requests()
            counts = [after.get(k, 0) - before.get(k, 0) for k in after]
            fair["clusterctl reuseport"] = {"status_json": counts, "status_cv": cv(counts), "per_pid": r["per_pid"],
                                            "per_pid_cv": r["per_pid_cv"]}
            ops.uninstall(c.sd, c.name, progress=lambda m: None)
        host_env = dict(os.environ, **env)
        for k in ("1", "n"):
            workers = 1 if k == "1" else self.n
            if self.have_gunicorn:
                p = free_port()
                log(f"gunicorn sync -w {workers}:")
                with Spawned([str(BIN / "gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{p}", "--log-level",
                              "warning", APP], host_env, p):
                    runs.setdefault("gunicorn", {})[k] = self.measure(p)
            if self.have_node:
                p = free_port()
                log(f"node cluster, {workers} workers:")
                with Spawned([NODE, str(BENCH / "apps" / "cluster.js")], dict(host_env, PORT=str(p),
                                                                            BENCH_WORKERS=str(workers)), p):
                    runs.setdefault("node cluster", {})[k] = self.measure(p)
            if self.have_pm2 and not self.quick:
                pm2 = Pm2()
                try:
                    p = free_port()
                    spec = "1" if k == "1" else "max"
                    pids = pm2.start(spec, p, env)
                    log(f"pm2 -i {spec} ({len(pids)} workers):")
                    runs.setdefault("pm2", {})[k] = dict(self.measure(p), workers=len(pids))
                finally:
                    pm2.close()
        for name, rr in runs.items():
            if "1" in rr and "n" in rr:
                rr["ratio"] = round(rr["n"]["rps"] / (self.n * rr["1"]["rps"]), 3)
                if name == "clusterctl":
                    self.target(f"scaling clusterctl {self.n} workers vs {self.n} x 1", rr["ratio"], ">= 0.95",
                                rr["ratio"] >= 0.95, "wrk shares the cores with the workers" if self.n <= 2 else "")
            if name.startswith(("gunicorn", "node", "pm2")) and "n" in rr:
                fair[name] = {"per_pid": rr["n"]["per_pid"], "per_pid_cv": rr["n"]["per_pid_cv"]}
        sec["runs"] = runs
        if "clusterctl" in runs:
            ours = runs["clusterctl"]["n"]["rps"]
            sec["vs_peers"] = {name: round(ours / rr["n"]["rps"], 2) for name, rr in runs.items()
                               if name != "clusterctl" and "n" in rr and rr["n"]["rps"]}
        for name, f in fair.items():
            if name.startswith("clusterctl") and isinstance(f, dict):
                self.target(f"fairness {name} CV (status --json)", f["status_cv"], "report", None)

    # 4. availability ------------------------------------------------------------------------------------------
    def steady(self) -> float:
        return 1.0 if self.quick else 3.0

    def event(self, load: Pacer, what: str, action: Callable[[], Any]) -> dict[str, Any]:
        """Steady load, then the event; compares the requests started during it with the steady ones before."""
        time.sleep(self.steady())
        t0 = time.monotonic()
        action()
        t_end = time.monotonic()
        # The window starts with the event and lasts at least as long as the steady one before it, so a
        # 50 ms kill and a 5 s reload are judged on samples of comparable size.
        t1 = max(t_end + 0.3, t0 + self.steady())
        time.sleep(max(0.0, t1 - time.monotonic()) + 0.2)
        steady = load.window(t0 - self.steady(), t0)
        during = load.window(t0, t1)
        ratio = _r(during["p99_ms"] / steady["p99_ms"]) if during["p99_ms"] and steady["p99_ms"] else None
        r = {"event_s": round(t_end - t0, 2), "window_s": round(t1 - t0, 2), "steady": steady, "during": during,
             "p99_ratio": ratio}
        log(f"  {what:34} {r['event_s']:5.2f}s  failed {during['failed']}/{during['requests']}  p50 {during['p50_ms']} "
            f"p99 {during['p99_ms']} max {during['max_ms']} ms  (steady p99 {steady['p99_ms']} ms, x{ratio})")
        return r

    def availability(self) -> None:
        sec = self.section("availability", f"{200 if not self.quick else 100} req/s of Connection: close to the hello "
                           f"route, {self.n} workers, events under load")
        rate = 100.0 if self.quick else 200.0
        self.boot()
        # README: with reuseport, scaling down stops a socket; this moves its queued connections to the others
        # instead of resetting them. Set in the sandbox's own network namespace only, never the host's.
        sb.netexec(self.sandbox, ["sysctl", "-q", "-w", "net.ipv4.tcp_migrate_req=1"], check=False)
        sec["tcp_migrate_req"] = sb.netexec(self.sandbox, ["sysctl", "-n", "net.ipv4.tcp_migrate_req"],
                                            check=False).stdout.strip()
        port = 9200
        n = self.n
        for balance in self.layouts:
            name = f"bavail{balance[:2]}"
            c = install(self.sandbox, name, port, balance, n, APP, {}, self.tmp, self.args.access_log)
            log(f"clusterctl ({balance}):")
            events: dict[str, Any] = {}
            with Pacer(port, self.sandbox, rate=rate) as load:
                events["rolling reload"] = self.event(load, "clusterctl reload (rolling)",
                                                      lambda c=c: ops.reload(c.sd, c.name, progress=lambda m: None))
                if not self.smoke:
                    events["restart all"] = self.event(load, f"systemctl reload-or-restart {name}@*",
                                                       lambda c=c: c.sd.systemctl("reload-or-restart", f"{c.name}@*"))
                    events["kill -9"] = self.event(load, "kill -9 one worker", lambda c=c: self.kill9(c))
                    events["scale"] = self.event(load, f"scale {n} -> {2 * n} -> {n}", lambda c=c: self.scale(c, n))
            sec[f"clusterctl {balance}"] = events
            ops.uninstall(c.sd, c.name, progress=lambda m: None)
            port += 1
            for what, ev in events.items():
                d = ev["during"]
                allowed = 4 if what == "kill -9" else 0  # at most one in flight per client thread
                self.target(f"availability {balance} {what}: failed", d["failed"], f"<= {allowed}", d["failed"] <= allowed)
                self.target(f"availability {balance} {what}: p99 during/steady", ev["p99_ratio"], "<= 2x",
                            ev["p99_ratio"] <= 2 if ev["p99_ratio"] is not None else None)
        host_env = dict(os.environ)
        if self.have_gunicorn:
            p = free_port()
            log(f"gunicorn sync -w {n}:")
            with Spawned([str(BIN / "gunicorn"), "-w", str(n), "-b", f"127.0.0.1:{p}", "--log-level", "warning", APP],
                         host_env, p) as g, Pacer(p, rate=rate) as load:
                sec["gunicorn"] = {"HUP reload": self.event(load, "kill -HUP (gunicorn reload)", lambda: self.hup(g.p.pid)),
                                   "kill -9": self.event(load, "kill -9 one worker", lambda: self.kill9_child(g.p.pid))}
        if self.have_node:
            p = free_port()
            log(f"node cluster, {n} workers:")
            with Spawned([NODE, str(BENCH / "apps" / "cluster.js")], dict(host_env, PORT=str(p), BENCH_WORKERS=str(n)),
                         p) as nd, Pacer(p, rate=rate) as load:
                sec["node cluster"] = {"kill -9": self.event(load, "kill -9 one worker", lambda: self.kill9_child(nd.p.pid))}
        if self.have_pm2:
            pm2 = Pm2()
            try:
                p = free_port()
                pm2.start("max", p, {})
                log(f"pm2 -i max ({len(pm2.pids())} workers):")
                with Pacer(p, rate=rate) as load:
                    sec["pm2"] = {"pm2 reload": self.event(load, "pm2 reload", lambda: pm2("reload", "bench")),
                                  "kill -9": self.event(load, "kill -9 one worker", lambda: self.kill9_pm2(pm2))}
            finally:
                pm2.close()

    def kill9(self, c: Cluster) -> None:
        unit = f"{c.name}@1.service"
        old = c.main_pids()[unit]
        c.sd.run(["kill", "-9", str(old)])
        self._until(lambda: c.main_pids().get(unit, old) not in (old, 0))

    def scale(self, c: Cluster, n: int) -> None:
        ops.scale(c.sd, c.name, str(2 * n), progress=lambda m: None)
        time.sleep(0.5)
        ops.scale(c.sd, c.name, str(n), progress=lambda m: None)

    def hup(self, master: int) -> None:
        old = set(children(master))
        os.kill(master, signal.SIGHUP)
        self._until(lambda: len(set(children(master)) - old) >= self.n and not (set(children(master)) & old))

    def kill9_child(self, primary: int) -> None:
        kids = children(primary)
        os.kill(kids[0], signal.SIGKILL)
        self._until(lambda: len(set(children(primary)) - {kids[0]}) >= len(kids) and kids[0] not in children(primary))

    def kill9_pm2(self, pm2: Pm2) -> None:
        pids = pm2.pids()
        os.kill(pids[0], signal.SIGKILL)
        self._until(lambda: len(set(pm2.pids()) - {pids[0]}) >= len(pids), timeout=20)

    @staticmethod
    def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.02)
        raise ClusterctlError(f"condition not met within {timeout:g}s", "")

    # 5. footprint ----------------------------------------------------------------------------------------------
    def footprint(self) -> None:
        sec = self.section("footprint", f"hello app (examples.hello:app), {self.n} workers")
        sys.path.insert(0, str(REPO))
        from bench.footprint import bytecode_cached

        # The workers (ProtectSystem=strict) cannot write __pycache__: without a cache in the tree they compile
        # clusterctl from source at every start, about 2 MB more resident each. Recorded, not changed.
        sec["bytecode_cached"] = bytecode_cached(PY)
        self.boot()
        c = install(self.sandbox, "bhello", 9300, "shared", self.n, "examples.hello:app", {}, self.tmp,
                    access_log=True, start=False)
        starts = []
        units = [f"{c.name}@{i}.service" for i in range(1, self.n + 1)]
        t0 = time.monotonic()
        c.sd.systemctl("is-active", f"{c.name}.target", check=False)
        nsenter = time.monotonic() - t0  # what one systemctl call through nsenter costs here
        for _ in range(1 if self.smoke else 2 if self.quick else 5):
            c.sd.systemctl("stop", f"{c.name}.target", *units, f"{c.name}.socket")
            t0 = time.monotonic()
            # A target is ordered After= what it Wants=, and the workers are Type=notify: this returns once
            # every instance sent READY=1.
            c.sd.systemctl("start", f"{c.name}.target")
            wall = time.monotonic() - t0
            sock = c.sd.show([f"{c.name}.socket"], ("InactiveExitTimestampMonotonic",))[0]
            rows = c.sd.show(units, ("ActiveEnterTimestampMonotonic", "ActiveState"))
            assert all(r["ActiveState"] == "active" for r in rows), rows
            # from the start job's first unit (the socket) to the last READY=1, by systemd's own clock
            ready = (max(int(r["ActiveEnterTimestampMonotonic"]) for r in rows)
                     - int(sock["InactiveExitTimestampMonotonic"])) / 1e6
            starts.append({"systemd_s": round(ready, 3), "wall_s": round(wall, 3)})
        wait_http(9300, self.sandbox)
        time.sleep(1.0)
        st = c.status()
        root = c.sd.root
        workers = [{"instance": i["instance"], "vmrss_mb": rss_mb(i["pid"], root), "pss_mb": pss_mb(i["pid"], root),
                    "memory_current_mb": _r((i["memory_bytes"] or 0) / 2**20, 1)} for i in st["instances"]]
        ops.uninstall(c.sd, c.name, progress=lambda m: None)
        med = statistics.median(s["systemd_s"] for s in starts)
        sec.update(start_to_ready=starts, start_to_ready_median_s=med, workers=workers,
                   systemctl_call_s=round(nsenter, 3))
        worst = max((w["vmrss_mb"] or 0) for w in workers)
        log(f"  start -> all READY: {', '.join(str(s['systemd_s']) for s in starts)} s (systemd timestamps; "
            f"wall incl. nsenter {', '.join(str(s['wall_s']) for s in starts)})")
        log(f"  idle RSS per worker: {[w['vmrss_mb'] for w in workers]} MB (PSS {[w['pss_mb'] for w in workers]}, MemoryCurrent "
            f"{[w['memory_current_mb'] for w in workers]} MB; clusterctl bytecode cache: "
            f"{'yes' if sec['bytecode_cached'] else 'no, compiled at start'})")
        self.target("footprint RSS per idle worker (MB)", worst, "<= 25", worst <= 25)
        self.target("footprint start -> all READY (s, median)", med, "< 1", med < 1)
        peers: dict[str, list[float | None]] = {}
        if self.have_gunicorn:
            p = free_port()
            with Spawned([str(BIN / "gunicorn"), "-w", str(self.n), "-b", f"127.0.0.1:{p}", "--log-level", "warning",
                          "examples.hello:app"], dict(os.environ), p) as g:
                time.sleep(1.0)
                peers["gunicorn sync worker (RSS)"] = [rss_mb(k) for k in children(g.p.pid)]
                peers["gunicorn sync worker (PSS)"] = [pss_mb(k) for k in children(g.p.pid)]
                peers["gunicorn primary (RSS)"] = [rss_mb(g.p.pid)]
        if self.have_node:
            p = free_port()
            with Spawned([NODE, str(BENCH / "apps" / "cluster.js")], dict(os.environ, PORT=str(p),
                                                                        BENCH_WORKERS=str(self.n)), p) as nd:
                time.sleep(1.0)
                peers["node cluster worker (RSS)"] = [rss_mb(k) for k in children(nd.p.pid)]
                peers["node cluster worker (PSS)"] = [pss_mb(k) for k in children(nd.p.pid)]
                peers["node cluster primary (RSS)"] = [rss_mb(nd.p.pid)]
        sec["peers_rss_mb"] = peers
        for k, v in peers.items():
            log(f"  {k}: {v} MB")

    # report ----------------------------------------------------------------------------------------------------
    def summary(self) -> None:
        log(f"\n== summary (N={self.n}; {self.res['meta']['cores']}; {loadavg()})")
        core = self.res.get("core", {})
        if core.get("best"):
            log("\ncore, req/s (keep-alive / close): " + ", ".join(
                f"{k} {v['keepalive']:.0f}/{v['close']:.0f}" for k, v in core["best"].items()))
        sc = self.res.get("scaling", {}).get("runs", {})
        if sc:
            log(f"\n{'scaling (~5 ms CPU/request)':30} {'1 worker':>9} {f'{self.n} workers':>10} {'ratio':>6}  "
                f"{'p50/p99 ms (N)':>16}  {'CV':>5}")
            for name, rr in sc.items():
                one = f"{rr['1']['rps']:.0f}" if "1" in rr else "-"
                nn = rr.get("n", {})
                lat = f"{nn.get('p50_us', 0) / 1000:.0f}/{nn.get('p99_us', 0) / 1000:.0f}" if nn else "-"
                log(f"{name:30} {one:>9} {nn.get('rps', 0):10.0f} {rr.get('ratio', '-')!s:>6}  {lat:>16}  "
                    f"{nn.get('per_pid_cv')!s:>5}")
        av = self.res.get("availability", {})
        rows = [(who, what, ev) for who, evs in av.items() if isinstance(evs, dict) for what, ev in evs.items()
                if isinstance(ev, dict) and "during" in ev]
        if rows:
            log(f"\n{'availability':44} {'failed':>9} {'p50':>6} {'p99':>7} {'max':>7} {'steady p99':>10} {'x':>5}")
            for who, what, ev in rows:
                d = ev["during"]
                log(f"{who + ': ' + what:44} {str(d['failed']) + '/' + str(d['requests']):>9} {d['p50_ms']!s:>6} "
                    f"{d['p99_ms']!s:>7} {d['max_ms']!s:>7} {ev['steady']['p99_ms']!s:>10} {ev['p99_ratio']!s:>5}")
        log("\ntargets:")
        for t in self.res["targets"]:
            mark = {True: "ok", False: "MISSED", None: "-"}[t["met"]]
            log(f"  {t['what']:58} {t['value']!s:>8}  {t['target']:>7}  {mark}" + (f"  ({t['note']})" if t["note"] else ""))


@contextlib.contextmanager
def bench_lock(enabled: bool) -> Iterator[None]:
    """Hold /tmp/clusterctl-bench.lock (the flock the engine's benchmarks take too) for the whole run."""
    if not enabled:
        yield
        return
    with open(LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {LOCK} (another benchmark is running)")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long loads, PM2 only where cheap: plumbing check")
    ap.add_argument("--only", nargs="*", choices=SECTIONS, default=None, help="run only these sections")
    ap.add_argument("--duration", type=int, default=0, help="seconds per measured wrk run (default 10, quick 1)")
    ap.add_argument("--workers", type=int, default=0, help="N (default: usable cores, clusterctl.control.cores)")
    ap.add_argument("--smoke", action="store_true", help="--quick, ours only, one event: the test suite's check")
    ap.add_argument("--no-peers", action="store_true", help="clusterctl only")
    ap.add_argument("--access-log", action="store_true", help="keep our per-request access log on (journald)")
    ap.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} (quick runs never do)")
    ap.add_argument("--output", type=Path, default=None, help="JSON file (default bench/out/suite-TIME.json)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("bench/run.py boots a real systemd in a sandbox: run it as root")
        return 2
    suite = Suite(args)
    sections = args.only or list(SECTIONS)
    OUT.mkdir(parents=True, exist_ok=True)
    kind = "-smoke" if args.smoke else "-quick" if args.quick else ""
    path = args.output or OUT / f"suite-{time.strftime('%Y%m%d-%H%M%S')}{kind}.json"
    try:
        with bench_lock(not args.quick and not args.no_lock):
            suite.meta()
            log(f"clusterctl bench: N={suite.n} ({suite.res['meta']['cores']}); {loadavg()}")
            if "fairness" in sections and "scaling" not in sections:
                sections.append("scaling")  # fairness is measured on the scaling runs
            for name in sections:
                if name == "fairness":
                    continue
                getattr(suite, name)()
                path.write_text(json.dumps(suite.res, indent=2))
    finally:
        suite.close()
        path.write_text(json.dumps(suite.res, indent=2))
    suite.summary()
    log(f"\nraw: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
