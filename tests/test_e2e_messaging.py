"""Messaging end to end in a real systemd: the usersCount example (examples/users.py) with 3 workers and a
periodic task every second counting the users of a SQLite database; broadcast and send through the CLI.

Each worker is observed through /users, which reports its instance, its `worker.state` (broadcasts) and
what its on_message handler `received`; requests loop (bounded) until every instance has answered.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clusterctl.cli import cli
from clusterctl.control import ops
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from tests.clusters import EXPOSURE_BOUND, exposure, installed
from tests.loadgen import request
from tests.worker_user import worker_user

REPO = Path(__file__).resolve().parent.parent
NAME = "users"
PORT = 8450
WORKERS = 3
DB = f"/var/lib/{NAME}-e2e/users.db"  # inside the sandbox

Seen = dict[str, dict[str, Any]]


@dataclass
class Cluster:
    sd: Systemd
    db: Path

    @property
    def sandbox(self) -> str:
        assert self.sd.sandbox
        return self.sd.sandbox

    def users(self) -> dict[str, Any]:
        with sb.netns(self.sandbox):
            status, body = request(PORT, "/users")
        assert status == 200, body
        return json.loads(body)

    def until(self, ok: Callable[[dict[str, Any]], bool], timeout: float = 20.0, workers: int = WORKERS) -> Seen:
        """Request /users until the latest answer of every instance satisfies `ok` (bounded in time)."""
        latest: Seen = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.users()
            latest[answer["instance"]] = answer
            if len(latest) == workers and all(ok(a) for a in latest.values()):
                return latest
            time.sleep(0.01)
        pytest.fail(f"not every instance got there within {timeout}s: {latest}")

    def cli(self, *args: str) -> tuple[int, str]:
        r = CliRunner().invoke(cli, [*args, "--sandbox", self.sandbox])
        return r.exit_code, r.output

    def add_users(self, n: int) -> None:
        """Insert into a host copy, then rename it over the sandbox's (SQLite cannot open a path under
        /proc/PID/root: it resolves the symlink)."""
        with sqlite3.connect(self.db) as db:
            db.executemany("INSERT INTO users (name) VALUES (?)", [(f"u{time.time_ns()}-{i}",) for i in range(n)])
        inside = self.sd.path(DB)
        tmp = inside.with_name(".users.db.tmp")
        shutil.copyfile(self.db, tmp)
        tmp.chmod(0o644)
        tmp.replace(inside)


@pytest.fixture(scope="module")
def cluster(sandbox: sb.Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # The "database" lives in the sandbox's own file tree (PrivateTmp= would hide one under the host's /tmp).
    sd = Systemd(sandbox=sandbox.name)
    sd.path(DB).parent.mkdir(mode=0o755, exist_ok=True)
    db = tmp_path_factory.mktemp("db") / "users.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    c = Cluster(sd, db)
    c.add_users(3)
    with installed(c.sd, tmp_path_factory.mktemp(NAME) / NAME, enable=True, app="examples.users:app", name=NAME,
                   workers=str(WORKERS), listen=[f"127.0.0.1:{PORT}"], working_dir=str(REPO), python=sys.executable,
                   user=worker_user(), env=[f"USERS_DB={DB}"], every="1s", task="examples.users:count_users") as written:
        assert f"/etc/systemd/system/{NAME}-task.timer" in written
        assert f"/etc/systemd/system/{NAME}-task.service" in written
        yield c
    assert not c.sd.path(f"/run/{NAME}").exists()
    assert not c.sd.path(f"/etc/systemd/system/{NAME}-task.timer").exists()
    assert not c.sd.list_units(f"{NAME}-task.*")


def test_timer_fires_and_updates_every_worker(cluster: Cluster) -> None:
    cluster.until(lambda a: a["usersCount"] == 3)
    cluster.add_users(2)
    t0 = time.time()
    seen = cluster.until(lambda a: a["usersCount"] == 5, timeout=15)
    assert all(a["countedAt"] >= t0 - 0.1 for a in seen.values())
    st = ops.status(cluster.sd, NAME)
    assert st.task.startswith(f"{NAME}-task.timer active/") and "; last run " in st.task, st.task
    code, out = cluster.cli("status", NAME)
    assert code == 0 and f"task: {NAME}-task.timer active/" in out, out


def test_broadcast_reaches_every_worker(cluster: Cluster) -> None:
    code, out = cluster.cli("broadcast", NAME, '{"motd": "hello, cluster"}')
    assert code == 0, out
    assert f"received by {WORKERS}/{WORKERS} instance(s): 1, 2, 3" in out
    cluster.until(lambda a: a["state"].get("motd") == "hello, cluster" and a["received"].get("motd") == "hello, cluster")


def test_restarted_worker_is_not_stale(cluster: Cluster) -> None:
    """A worker restarted after the broadcast loads it from /run/NAME/state.json before READY=1."""
    code, out = cluster.cli("broadcast", NAME, '{"release": "r42"}')
    assert code == 0, out
    pid = cluster.sd.show([f"{NAME}@2.service"], ("MainPID",))[0]["MainPID"]
    cluster.sd.systemctl("restart", f"{NAME}@2.service")  # returns after READY=1
    assert cluster.sd.show([f"{NAME}@2.service"], ("MainPID",))[0]["MainPID"] != pid
    seen = cluster.until(lambda a: True)
    assert seen["2"]["state"]["release"] == "r42" and seen["2"]["state"]["motd"] == "hello, cluster"
    assert seen["2"]["received"]["release"] == "r42"  # handlers get the saved state once on start
    assert all(a["state"]["release"] == "r42" for a in seen.values())


def test_scaled_up_worker_starts_with_the_state_and_the_timer_stays(cluster: Cluster) -> None:
    ops.scale(cluster.sd, NAME, "+1", progress=lambda m: None)
    try:
        seen = cluster.until(lambda a: True, workers=WORKERS + 1)
        assert seen["4"]["state"]["motd"] == "hello, cluster" and seen["4"]["usersCount"] == 5
        target = cluster.sd.path(f"/etc/systemd/system/{NAME}.target").read_text()
        assert f"Wants={NAME}-task.timer" in target and f"Wants={NAME}@4.service" in target
    finally:
        ops.scale(cluster.sd, NAME, str(WORKERS), progress=lambda m: None)
    assert f"Wants={NAME}-task.timer" in cluster.sd.path(f"/etc/systemd/system/{NAME}.target").read_text()


def test_send_reaches_one_instance_only(cluster: Cluster) -> None:
    code, out = cluster.cli("send", NAME, "2", '{"note": "only for 2"}')
    assert code == 0 and "received by 1/1 instance(s): 2" in out, out
    seen = cluster.until(lambda a: a["instance"] != "2" or a["received"].get("note") == "only for 2")
    assert "note" not in seen["1"]["received"] and "note" not in seen["3"]["received"]
    assert all("note" not in a["state"] for a in seen.values())  # a send is not state
    code, out = cluster.cli("send", NAME, "9", '{"note": "nobody"}')
    assert code != 0 and "not received by 9 (not running)" in out


@pytest.mark.parametrize("message, why", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                          (json.dumps({"big": "x" * 70_000}), "more than the limit of 65536")])
def test_bad_messages_are_refused_and_workers_keep_serving(cluster: Cluster, message: str, why: str) -> None:
    code, out = cluster.cli("broadcast", NAME, message)
    assert code == 2 and "nothing sent" in out and why in out, out
    assert "big" not in cluster.sd.path(f"/run/{NAME}/state.json").read_text()
    seen = cluster.until(lambda a: True)
    assert all("big" not in a["state"] for a in seen.values())


def test_a_bad_datagram_is_logged_and_dropped(cluster: Cluster) -> None:
    """Something other than clusterctl writing to a worker's socket: logged, dropped, the worker serves on."""
    import socket

    pid = cluster.sd.show([f"{NAME}@1.service"], ("MainPID",))[0]["MainPID"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x00garbage", str(cluster.sd.path(f"/run/{NAME}/worker-1.sock")))
    deadline = time.monotonic() + 10
    while "dropped a bad message" not in cluster.sd.journalctl("-u", f"{NAME}@1.service", "-o", "cat"):
        assert time.monotonic() < deadline, "no log line about the bad message"
        time.sleep(0.2)
    cluster.until(lambda a: True)
    assert cluster.sd.show([f"{NAME}@1.service"], ("MainPID",))[0]["MainPID"] == pid


def test_task_unit_is_hardened_like_the_workers(sandbox: sb.Sandbox, tmp_path: Path) -> None:
    """The default (DynamicUser, User=NAME) task unit scores like the workers under systemd-analyze security."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 to name in ExecStart")
    sd = Systemd(sandbox=sandbox.name)
    with installed(sd, tmp_path / "scoretask", start=False, app="examples.users:app", name="scoretask", workers="1",
                   listen=["127.0.0.1:8451"], working_dir=str(REPO), python="/usr/bin/python3", every="1min",
                   task="examples.users:count_users", check=False):
        task_user = sd.show(["scoretask-task.service"], ("User", "DynamicUser"))[0]
        assert task_user == {"User": "clusterctl-scoretask", "DynamicUser": "yes"}
        task, workers = exposure(sandbox, "scoretask-task.service"), exposure(sandbox, "scoretask@1.service")
        print(f"\nexposure: task unit {task}, worker unit {workers}")
        assert task <= EXPOSURE_BOUND
