"""The benchmark suite's plumbing, in seconds: `bench/run.py --smoke` boots its sandbox, drives every section
with 1 s loads (ours only, one event) and writes its JSON. Structure only, never speed: benchmarks are not
timed assertions, and this machine is shared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clusterctl.control import sandbox as sb

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def can_sandbox(sandbox_factory) -> None:
    """The suite boots its own sandbox: only the host check (skip, or fail under CI) is shared with conftest."""
    sandbox_factory.reap_once()
    if not Path("/usr/bin/wrk").exists():
        pytest.skip("wrk is not installed (.ci/setup installs it)")


@pytest.mark.systemd
def test_bench_smoke_writes_every_section(can_sandbox: None, tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--output", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"meta", "targets", "core", "scaling", "fairness", "availability", "footprint"} <= res.keys()
    assert res["meta"]["n"] >= 1 and res["meta"]["smoke"] is True
    assert all("uptime" in res[s] for s in ("core", "scaling", "availability", "footprint"))
    if "skipped" not in res["core"]:
        assert "clusterctl" in res["core"]["best"]
    runs = res["scaling"]["runs"]["clusterctl"]
    assert runs["1"]["requests"] > 0 and runs["n"]["requests"] > 0 and "ratio" in runs
    assert {"rps", "p50_us", "p99_us", "max_us", "errors", "per_pid"} <= runs["n"].keys()
    assert "status_cv" in res["fairness"]["clusterctl shared"]
    ev = res["availability"]["clusterctl shared"]["rolling reload"]
    assert {"steady", "during", "p99_ratio"} <= ev.keys() and ev["during"]["requests"] > 0
    assert {"failed", "p50_ms", "p99_ms", "max_ms"} <= ev["during"].keys()
    fp = res["footprint"]
    assert fp["start_to_ready"] and fp["workers"] and all(w["vmrss_mb"] for w in fp["workers"])
    assert all({"what", "value", "target", "met"} <= t.keys() for t in res["targets"])
    assert not sb.is_running(f"bench{os.getpid()}")  # its sandbox is gone (named after the run's pid, not ours)


SSA = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"


@pytest.mark.skipif(not os.path.exists(SSA) or shutil.which("taskset") is None or 1 not in os.sched_getaffinity(0),
                    reason="bench_ws.py needs systemd-socket-activate, taskset and core 1")
def test_bench_ws_smoke(tmp_path: Path) -> None:
    """bench/bench_ws.py end to end for half a second, ours only: its client processes connect, start together,
    count round trips and latencies, and the parent sums them. Structure only (no lock: seconds, not figures)."""
    out = tmp_path / "ws.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_ws.py"), "--only", "clusterctl", "--rounds", "1",
                        "--duration", "0.5", "--warmup", "0", "--clients", "2", "--connections", "2", "--no-lock",
                        "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = json.loads(out.read_text())["raw"]["clusterctl"]
    assert run["round_trips"] > 0 and run["errors"] == [] and 0 < run["p50_ms"] <= run["p99_ms"]
    assert 0 < run["server_core_busy"] <= 1 and run["client_cpu_s"] > 0
