"""`systemctl reload 'NAME@*'` as a rolling deploy, against a real systemd in the sandbox and under load.

One cluster of 4 workers whose app takes a second to import (a release file the tests rewrite). How many
processes serve at each moment comes from the workers' own journal lines: a process serves from its
"serving ... (pid P)" line until its "draining" line. The reload must never go below 4; a plain
`systemctl restart 'NAME@*'` (the contrast, and what reload-or-restart did before ExecReload=) goes to 0.
Run with -s to see the figures bench/RESULTS.md quotes.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl import messaging
from clusterctl.cli import cli
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from clusterctl.errors import CommandError
from tests.loadgen import Load, request
from tests.worker_user import share_app, user_args

NAME = "rollme"
PORT = 8300
WORKERS = 4
WATCHDOG = 5  # seconds: short, so a new main process that never pings would be killed within the test
UNITS = [f"{NAME}@{i}.service" for i in range(1, WORKERS + 1)]

RELEASE = '''"""Release {release}: imports for a second, like a real project."""
import json
import os
import time

from clusterctl import worker

time.sleep(1.0)
{extra}

@worker.on_message
def seen(message):
    # Every process records the state it has, so a test can check each one saw a broadcast.
    path = os.path.join(os.environ["RUNTIME_DIRECTORY"], "seen-%d.json" % os.getpid())
    with open(path, "w") as f:
        json.dump(dict(worker.state), f)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(2)  # on the event loop: below WatchdogSec=
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"{release} %d" % os.getpid()]
'''


def write_release(app_dir: Path, sd: Systemd, release: str, extra: str = "") -> None:
    text = RELEASE.format(release=release, extra=extra)
    (app_dir / "rollapp.py").write_text(text)
    sd.path(app_dir / "rollapp.py").write_text(text)  # the sandbox's overlay may hold its own copy


def cursor(sd: Systemd) -> str:
    return json.loads(sd.journalctl("-n", "1", "-o", "json").splitlines()[-1])["__CURSOR"]


def serving_timeline(sd: Systemd, since: str) -> list[tuple[float, int]]:
    """(seconds, processes serving) after each change, from the workers' journal lines since `since`."""
    events = []
    for line in sd.journalctl("-u", f"{NAME}@*", "-o", "json", "--after-cursor", since).splitlines():
        e = json.loads(line)
        msg = e.get("MESSAGE")
        if not isinstance(msg, str):
            continue
        t = int(e["__REALTIME_TIMESTAMP"]) / 1e6
        if m := re.search(r"clusterctl\.worker: serving .* \(pid (\d+)\)$", msg):
            events.append((t, 0, int(m.group(1))))
        elif re.search(r"clusterctl\.worker: .*: draining \d+ in flight", msg):
            events.append((t, 1, int(e["_PID"])))
    serving = WORKERS
    out = []
    for t, kind, _pid in sorted(events):  # at one timestamp a start counts before a drain
        serving += 1 if kind == 0 else -1
        out.append((t, serving))
    return out


def below(timeline: list[tuple[float, int]], n: int) -> float:
    """Seconds the count spent below n."""
    return sum(t2 - t1 for (t1, c), (t2, _) in itertools.pairwise(timeline) if c < n)


def show(sd: Systemd, prop: str) -> list[str]:
    return [r.get(prop, "") for r in sd.show(UNITS, (prop,))]


@pytest.fixture(scope="module")
def cluster(sandbox: sb.Sandbox, sandbox_share: Path, tmp_path_factory: pytest.TempPathFactory):
    sd = Systemd(sandbox=sandbox.name)
    app_dir = share_app(sandbox_share, "rollapp", RELEASE.format(release="v1", extra=""))
    out = tmp_path_factory.mktemp("reload") / NAME
    result = CliRunner().invoke(cli, [
        "generate", "--app", "rollapp:app", "--name", NAME, "--workers", str(WORKERS), "--listen",
        f"127.0.0.1:{PORT}", "--working-dir", str(app_dir), "--watchdog-sec", str(WATCHDOG), "--python", sys.executable,
        "--output", str(out),
        *user_args(app_dir)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["install", str(out), "--start", "--sandbox", sandbox.name])
    assert result.exit_code == 0, result.output
    yield sd, app_dir
    CliRunner().invoke(cli, ["uninstall", NAME, "--sandbox", sandbox.name])


def get(sd: Systemd, path: str = "/") -> tuple[int, bytes]:
    assert sd.sandbox
    with sb.netns(sd.sandbox):
        return request(PORT, path)


def deploy_under_load(sd: Systemd, verb: str) -> dict[str, float]:
    """`systemctl VERB 'NAME@*'` under 200 req/s (a new connection each); the figures, and asserts 0 failed."""
    mark = cursor(sd)
    assert sd.sandbox
    with Load(sd.sandbox, PORT, threads=4, rate=200) as load:
        load.wait_for(60)
        t0 = time.monotonic()
        sd.systemctl(verb, f"{NAME}@*", timeout=120)
        took = time.monotonic() - t0
        load.wait_for(load.result.total + 60)
    timeline = serving_timeline(sd, mark)
    lat = sorted(load.result.latencies)
    figures = {"seconds": round(took, 2), "requests": load.result.total, "failed": len(load.result.errors),
               "min_serving": min(c for _, c in timeline), "below_4_s": round(below(timeline, WORKERS), 2),
               "none_serving_s": round(below(timeline, 1), 2), "p99_ms": round(load.result.p99() * 1000, 1),
               "max_ms": round(lat[-1] * 1000, 1)}
    print(f"\nsystemctl {verb} '{NAME}@*' with {WORKERS} workers, 1 s import, 200 req/s: {figures}")
    assert load.result.errors == [], load.result.errors[:5]
    assert load.result.ok >= 100
    return figures


def test_reload_is_a_rolling_deploy_under_load(cluster: tuple[Systemd, Path]) -> None:
    sd, app_dir = cluster
    pids, restarts = show(sd, "MainPID"), show(sd, "NRestarts")
    write_release(app_dir, sd, "v2")
    figures = deploy_under_load(sd, "reload")
    assert figures["min_serving"] >= WORKERS  # never fewer than 4 processes accepting
    new = show(sd, "MainPID")
    assert set(new).isdisjoint(pids) and len(set(new)) == WORKERS
    assert show(sd, "NRestarts") == restarts  # a reload is not a restart
    assert show(sd, "ActiveState") == ["active"] * WORKERS
    assert all(get(sd)[1].startswith(b"v2 ") for _ in range(8))
    # the new main processes notify systemd: their watchdog pings keep them alive past WatchdogSec=
    time.sleep(WATCHDOG + 1)
    assert show(sd, "MainPID") == new and show(sd, "NRestarts") == restarts
    # no process ran unsupervised or notified out of turn
    journal = sd.journalctl("-o", "cat", "_PID=1")
    assert "not our child" not in journal and "reception only permitted" not in journal


def test_restart_is_the_contrast(cluster: tuple[Systemd, Path]) -> None:
    sd, _ = cluster
    figures = deploy_under_load(sd, "restart")
    assert figures["min_serving"] == 0  # every instance stopped at once, then a second of import


def test_reload_onto_a_broken_release_keeps_the_old_code(cluster: tuple[Systemd, Path]) -> None:
    sd, app_dir = cluster
    pids = show(sd, "MainPID")
    serving = get(sd)[1].split()[0]
    mark = cursor(sd)
    write_release(app_dir, sd, "v3", extra="raise ImportError('release 3 is broken')")
    t0 = time.monotonic()
    result = sd.systemctl("reload", f"{NAME}@*", timeout=120, check=False)
    took = time.monotonic() - t0
    write_release(app_dir, sd, "v2")
    assert result.returncode != 0
    assert show(sd, "MainPID") == pids and show(sd, "ActiveState") == ["active"] * WORKERS
    assert all(get(sd)[1].split()[0] == serving for _ in range(8))
    log = sd.journalctl("-u", f"{NAME}@*", "-o", "cat", "--after-cursor", mark)
    assert re.search(r"reload failed: the new process \(pid \d+\) failed: importing 'rollapp' raised ImportError: "
                     r"release 3 is broken", log), log[-3000:]
    assert "Reload failed for" in log
    # the first failure stops the rest: they fail at once instead of importing the same release
    assert log.count("not tried: ") == WORKERS - 1, log[-3000:]
    assert took < 5, took
    assert "failed" not in sd.systemctl("list-units", "--failed", f"{NAME}@*", "--plain", "--no-legend").stdout


def test_long_request_survives_reload(cluster: tuple[Systemd, Path]) -> None:
    sd, _ = cluster
    outcome: list[object] = []
    t = threading.Thread(target=lambda: outcome.append(get(sd, "/slow")), daemon=True)
    t.start()
    time.sleep(0.5)
    sd.systemctl("reload", f"{NAME}@*", timeout=120)
    t.join(10)
    assert outcome and outcome[0][0] == 200, outcome  # type: ignore[index]


def test_broadcast_during_reload_reaches_every_new_process(cluster: tuple[Systemd, Path]) -> None:
    sd, _ = cluster
    assert sd.sandbox
    run_dir = sd.path(messaging.runtime_dir(NAME))
    reloading = threading.Thread(target=lambda: sd.systemctl("reload", f"{NAME}@*", timeout=120), daemon=True)
    reloading.start()
    delivered = []
    for k in range(6):  # before, during and after the switches (each takes about a second)
        time.sleep(0.6)
        delivered.append(messaging.deliver(run_dir, {f"during{k}": k}))
    reloading.join(60)
    assert not reloading.is_alive()
    for pid in show(sd, "MainPID"):
        seen = json.loads((run_dir / f"seen-{pid}.json").read_text())
        assert {f"during{k}": k for k in range(6)}.items() <= seen.items(), (  # with what to diagnose a miss by
            pid, seen, [d.summary(NAME) for d in delivered],
            sd.journalctl("-u", f"{NAME}@*", "-n", "80", "-o", "short-precise"))


def test_stop_during_reload_leaves_nothing_failed(cluster: tuple[Systemd, Path]) -> None:
    sd, _ = cluster
    errors: list[Exception] = []

    def reload() -> None:
        try:
            sd.systemctl("reload", f"{NAME}@*", timeout=120)
        except CommandError as e:
            errors.append(e)

    reloading = threading.Thread(target=reload, daemon=True)
    reloading.start()
    time.sleep(1.5)  # one switch done, the next one importing
    sd.systemctl("stop", f"{NAME}@*", timeout=120)
    reloading.join(60)
    assert show(sd, "ActiveState") == ["inactive"] * WORKERS
    assert show(sd, "Result") == ["success"] * WORKERS
    sd.systemctl("start", *UNITS, timeout=120)
    assert show(sd, "ActiveState") == ["active"] * WORKERS


def test_killed_replacement_is_restarted(cluster: tuple[Systemd, Path]) -> None:
    sd, _ = cluster
    sd.systemctl("reload", UNITS[0], timeout=120)
    pid = show(sd, "MainPID")[0]
    restarts = int(show(sd, "NRestarts")[0])
    sb.exec(sd.sandbox or "", ["kill", "-9", pid])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        row = sd.show(UNITS[:1], ("MainPID", "NRestarts", "ActiveState"))[0]
        if int(row["NRestarts"]) > restarts and row["ActiveState"] == "active" and row["MainPID"] not in ("0", pid):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"{UNITS[0]} was not restarted after kill -9 of its replacement {pid}: {row}")
