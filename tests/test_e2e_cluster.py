"""End to end against a real systemd (PID 1 of a clusterctl sandbox) and real HTTP clients.

Each layout gets its own cluster of the bundled example app in the session's sandbox; load comes from
client threads inside the sandbox's network namespace (tests/loadgen.py), bounded in time and count.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusterctl.control import ops
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from tests.clusters import install, uninstall
from tests.loadgen import Load, request
from tests.worker_user import worker_user

REPO = Path(__file__).resolve().parent.parent
WATCHDOG = 2  # seconds: WatchdogSec=, shorter than requests the timeout allows (/slow?seconds=3.5)
TIMEOUT = 5  # seconds: --timeout, which /hang outlives


@dataclass
class Cluster:
    name: str
    port: int
    balance: str
    workers: int
    sd: Systemd

    @property
    def sandbox(self) -> str:
        assert self.sd.sandbox
        return self.sd.sandbox

    def get(self, path: str = "/") -> tuple[int, bytes]:
        with sb.netns(self.sandbox):
            return request(self.port, path)

    def get_in_background(self, path: str) -> tuple[threading.Thread, list[object]]:
        """Start one GET in a thread; the list receives its (status, body) or the OSError it died with."""
        outcome: list[object] = []

        def run() -> None:
            try:
                outcome.append(self.get(path))
            except OSError as e:
                outcome.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, outcome

    def show(self, prop: str) -> list[str]:
        rows = self.sd.show([f"{self.name}@{i}.service" for i in range(1, self.workers + 1)], (prop,))
        return [r.get(prop, "") for r in rows]

    def wait_all_active(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s == "active" for s in self.show("ActiveState")):
                return
            time.sleep(0.1)
        pytest.fail(f"{self.name}: not all instances active: {self.show('ActiveState')}")


def install_cluster(sandbox: sb.Sandbox, out: Path, name: str, port: int, balance: str, workers: int = 2,
                    worker_args: tuple[str, ...] = ()) -> Cluster:
    sd = Systemd(sandbox=sandbox.name)
    install(sd, out, enable=True, app="examples.hello:app", name=name, workers=str(workers),
            listen=[f"127.0.0.1:{port}"], balance=balance, working_dir=str(REPO), python=sys.executable,
            user=worker_user(), watchdog_sec=WATCHDOG, timeout=TIMEOUT, worker_args=worker_args)
    return Cluster(name, port, balance, workers, sd)


@pytest.fixture(scope="module", params=["shared", "reuseport"])
def cluster(request: pytest.FixtureRequest, sandbox: sb.Sandbox, tmp_path_factory: pytest.TempPathFactory):
    balance = request.param
    name = f"hello-{balance}"
    c = install_cluster(sandbox, tmp_path_factory.mktemp(name), name, 8100 + len(balance), balance)
    yield c
    uninstall(c.sd, c.name)


def test_all_instances_ready_and_serving(cluster: Cluster, sandbox_host) -> None:
    st = ops.status(cluster.sd, cluster.name)
    assert [(i.instance, i.state, i.sub_state) for i in st.instances] == [
        (str(i), "active", "running") for i in range(1, cluster.workers + 1)]
    assert all(i.pid > 0 for i in st.instances)
    assert cluster.get("/") == (200, b"Hello, world!\n")
    # testinfra, answering from inside the sandbox
    assert sandbox_host.service(f"{cluster.name}@1").is_running
    assert sandbox_host.service(f"{cluster.name}.target").is_enabled
    assert sandbox_host.socket(f"tcp://127.0.0.1:{cluster.port}").is_listening
    unit = sandbox_host.file(f"/etc/systemd/system/{cluster.name}@.service")
    assert unit.exists and unit.mode == 0o644 and "Type=notify" in unit.content_string
    # our STATUS= line, as systemctl status shows it (the runtime sends it about once a second)
    deadline = time.monotonic() + 5
    out = ""
    while time.monotonic() < deadline and "served=" not in out:
        out = cluster.sd.systemctl("status", f"{cluster.name}@1", check=False).stdout
        time.sleep(0.2)
    assert 'Status: "served=' in out


def test_rolling_restart_one_at_a_time_loses_nothing(cluster: Cluster) -> None:
    pids = cluster.show("MainPID")
    with Load(cluster.sandbox, cluster.port) as load:
        for i in range(1, cluster.workers + 1):
            cluster.sd.systemctl("restart", f"{cluster.name}@{i}.service")
            load.wait_for(load.result.total + 20)
    assert load.result.errors == []
    assert load.result.ok >= 50
    assert set(cluster.show("MainPID")).isdisjoint(pids)


def test_restart_all_at_once_loses_nothing(cluster: Cluster) -> None:
    pids = cluster.show("MainPID")
    with Load(cluster.sandbox, cluster.port) as load:
        cluster.sd.systemctl("restart", f"{cluster.name}@*")  # reload-or-restart now reloads: tests/test_e2e_reload.py
        load.wait_for(load.result.total + 40)
    assert load.result.errors == []
    assert load.result.ok >= 50
    assert set(cluster.show("MainPID")).isdisjoint(pids)


def test_clusterctl_reload_under_load_loses_nothing(cluster: Cluster) -> None:
    """`clusterctl reload`: shared, a surge instance first; reuseport, each worker's own socket unit stopped
    before its restart (the worker keeps accepting on its copy until it exits): no request is lost either way."""
    if cluster.balance == "reuseport":
        sb.netexec(cluster.sandbox, ["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"])
    pids = cluster.show("MainPID")
    said: list[str] = []
    with Load(cluster.sandbox, cluster.port, threads=4, rate=400) as load:
        load.wait_for(40)
        ops.reload(cluster.sd, cluster.name, progress=said.append)
        load.wait_for(load.result.total + 40)
    assert load.result.errors == []
    assert load.result.ok >= 80
    assert set(cluster.show("MainPID")).isdisjoint(pids)
    assert said[-1].startswith(f"{cluster.name}: {cluster.workers}/{cluster.workers} instances on the new code")
    sockets = [f"{cluster.name}.socket"] if cluster.balance == "shared" else [
        f"{cluster.name}-listen@{i}.socket" for i in range(1, cluster.workers + 1)]
    assert [r["ActiveState"] for r in cluster.sd.show(sockets, ("ActiveState",))] == ["active"] * len(sockets)


def test_scale_up_and_down_under_load_loses_nothing(cluster: Cluster) -> None:
    """Scaling down drains the leaving workers; with reuseport their own sockets close first, and the kernel
    hands what is still queued to the others (net.ipv4.tcp_migrate_req=1, as the README says to set)."""
    if cluster.balance == "reuseport":
        sb.netexec(cluster.sandbox, ["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"])
    with Load(cluster.sandbox, cluster.port, threads=4, rate=400) as load:
        for count in ("4", "2", "+1", "-1"):
            ops.scale(cluster.sd, cluster.name, count, progress=lambda m: None)
            load.wait_for(load.result.total + 60)
    assert load.result.errors == []
    assert load.result.ok >= 200
    gone = cluster.sd.show([f"{cluster.name}@3.service", f"{cluster.name}@4.service"], ("ActiveState",))
    assert [r["ActiveState"] for r in gone] == ["inactive", "inactive"]
    cluster.wait_all_active()


def test_kill_9_is_replaced_and_loses_at_most_in_flight(cluster: Cluster) -> None:
    unit = f"{cluster.name}@1.service"
    victim = cluster.sd.show([unit], ("MainPID", "NRestarts"))[0]
    with Load(cluster.sandbox, cluster.port, threads=4) as load:
        cluster.sd.run(["kill", "-9", victim["MainPID"]])
        load.wait_for(load.result.total + 100, timeout=15)
    cluster.wait_all_active()
    after = cluster.sd.show([unit], ("MainPID", "NRestarts", "ActiveState", "SubState"))[0]
    assert after["MainPID"] != victim["MainPID"]
    assert int(after["NRestarts"]) == int(victim["NRestarts"]) + 1
    assert (after["ActiveState"], after["SubState"]) == ("active", "running")  # READY: Type=notify
    assert len(load.result.errors) <= 4, load.result.errors  # at most one in flight per client thread
    assert load.result.ok >= 50


def test_request_over_timeout_replaces_the_worker_and_names_it(cluster: Cluster) -> None:
    before = dict(zip(cluster.show("Id"), cluster.show("MainPID"), strict=True))
    restarts = dict(zip(cluster.show("Id"), cluster.show("NRestarts"), strict=True))
    t0 = time.monotonic()
    t, outcome = cluster.get_in_background("/hang")
    deadline = time.monotonic() + TIMEOUT + 15
    changed: list[str] = []
    while time.monotonic() < deadline and not changed:
        now = dict(zip(cluster.show("Id"), cluster.show("MainPID"), strict=True))
        changed = [u for u in before if now.get(u) not in (before[u], "0")]
        time.sleep(0.2)
    assert len(changed) == 1, "no hung worker was replaced"
    assert time.monotonic() - t0 >= TIMEOUT - 0.5, "replaced before --timeout"
    t.join(timeout=5)
    assert outcome and isinstance(outcome[0], OSError), outcome  # the hung request died with its worker
    unit = changed[0]
    instance = unit.split("@")[1].split(".")[0]
    journal = cluster.sd.journalctl("-u", unit, "-o", "cat")
    line = next((x for x in journal.splitlines() if "request timeout: GET /hang has run" in x), "")
    assert f"over --timeout {TIMEOUT} s on instance {instance}" in line, journal[-3000:]
    assert "examples/hello.py" in journal  # the stack it was stuck in
    assert "Watchdog timeout" not in journal  # the timeout, not systemd's watchdog, replaced it
    cluster.wait_all_active()
    assert int(cluster.show("NRestarts")[int(instance) - 1]) == int(restarts[unit]) + 1
    assert cluster.get("/") == (200, b"Hello, world!\n")


def test_request_longer_than_the_watchdog_within_timeout_is_served(cluster: Cluster) -> None:
    pids, restarts = cluster.show("MainPID"), cluster.show("NRestarts")
    assert cluster.get("/slow?seconds=3.5") == (200, b"slept 3.5\n")  # WatchdogSec=2 < 3.5 s < --timeout 5
    assert (cluster.show("MainPID"), cluster.show("NRestarts")) == (pids, restarts)


def test_sigterm_drains_a_slow_request(cluster: Cluster) -> None:
    t, result = cluster.get_in_background("/slow?seconds=1.5")
    time.sleep(0.4)  # the request is being served (its worker sleeps in the app)
    t0 = time.monotonic()
    cluster.sd.systemctl("restart", *[f"{cluster.name}@{i}.service" for i in range(1, cluster.workers + 1)])
    t.join(timeout=10)
    assert result == [(200, b"slept 1.5\n")]
    assert time.monotonic() - t0 < 10


def test_access_log_and_structured_fields_in_journal(cluster: Cluster) -> None:
    probe = f"/probe-{cluster.balance}-{time.monotonic_ns()}"
    assert cluster.get(probe)[0] == 404
    deadline = time.monotonic() + 5
    hits: list[dict] = []
    while time.monotonic() < deadline and not hits:
        out = cluster.sd.journalctl("-u", f"{cluster.name}@*", "-o", "json", "--since", "-60s")
        hits = [e for e in map(json.loads, out.splitlines()) if probe in str(e.get("MESSAGE", ""))
                or e.get("PATH") == probe]
        time.sleep(0.2)
    assert hits, "no journal entry for the request"
    structured = [e for e in hits if e.get("PATH") == probe]
    assert structured, hits
    e = structured[0]
    assert e["METHOD"] == "GET" and e["STATUS"] == "404"
    assert e["_SYSTEMD_UNIT"].startswith(f"{cluster.name}@")
    assert any(probe in str(h.get("MESSAGE", "")) and "404" in str(h.get("MESSAGE", "")) for h in hits)


def test_max_memory_restart_recycles_under_systemd(sandbox: sb.Sandbox, tmp_path: Path) -> None:
    """--worker-args '--max-memory-restart 96M' in the unit: a worker grown past it answers, drains, exits 0,
    and systemd starts a fresh one (RestartForceExitStatus=0); the request that grew it is not lost."""
    c = install_cluster(sandbox, tmp_path / "mem", "hello-mem", 8131, "shared", workers=1,
                        worker_args=("--max-memory-restart 96M",))
    try:
        pid = c.show("MainPID")[0]
        assert c.get("/grow?mb=128") == (200, b"holding 128 MiB\n")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and c.show("MainPID")[0] in (pid, "0"):
            time.sleep(0.1)
        c.wait_all_active()
        assert c.show("MainPID")[0] != pid
        assert c.show("NRestarts") == ["1"]
        assert c.get("/") == (200, b"Hello, world!\n")
        deadline = time.monotonic() + 5
        log = ""
        while time.monotonic() < deadline and "over --max-memory-restart" not in log:
            log = c.sd.journalctl("-u", "hello-mem@1.service", "-o", "cat")
            time.sleep(0.2)
        assert "over --max-memory-restart 96.0 MiB" in log, log[-2000:]
    finally:
        uninstall(c.sd, c.name)
