"""The PM2-style operations end to end, through the CLI, against a real systemd in the sandbox:
install -> status --json -> rolling reload under load -> scale 2 -> 4 -> 1 under load -> logs -> uninstall.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.cli import cli
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from tests.loadgen import Load
from tests.worker_user import user_args

REPO = Path(__file__).resolve().parent.parent
NAME = "opsdemo"
PORT = 8200


def clusterctl(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def journal_events(sd: Systemd, since_cursor: str | None) -> list[tuple[int, str, str]]:
    """(usec, unit, message) of systemd's own Starting/Started/Stopping lines about our instances."""
    args = ["-o", "json", "_PID=1"]
    args += ["--after-cursor", since_cursor] if since_cursor else []
    out = []
    for line in sd.journalctl(*args).splitlines():
        e = json.loads(line)
        unit = e.get("UNIT", "")
        if unit.startswith(f"{NAME}@"):
            out.append((int(e["__REALTIME_TIMESTAMP"]), unit, str(e.get("MESSAGE"))))
    return out


def cursor(sd: Systemd) -> str:
    out = sd.journalctl("-n", "1", "-o", "json")
    return json.loads(out.splitlines()[-1])["__CURSOR"]


@pytest.fixture(scope="module")
def units(sandbox: sb.Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ops") / NAME
    clusterctl("generate", "--app", "examples.hello:app", "--name", NAME, "--workers", "2", "--listen",
               f"127.0.0.1:{PORT}", "--working-dir", str(REPO), "--python", sys.executable, "--output", str(out),
               *user_args())
    return out


def test_operations_lifecycle(sandbox: sb.Sandbox, units: Path) -> None:
    s = sandbox.name
    sd = Systemd(sandbox=s)

    # unknown cluster: one clear line, non-zero
    result = CliRunner().invoke(cli, ["status", "nosuch", "--sandbox", s])
    assert result.exit_code != 0 and "not installed" in result.output

    out = clusterctl("install", str(units), "--enable", "--start", "--sandbox", s)
    assert f"installed /etc/systemd/system/{NAME}@.service" in out
    assert "2/2 instances READY" in out

    st = json.loads(clusterctl("status", NAME, "--json", "--sandbox", s))
    assert st["workers"] == 2 and st["balance"] == "shared" and st["listen"] == [f"127.0.0.1:{PORT}"]
    assert [(i["instance"], i["state"], i["sub_state"]) for i in st["instances"]] == [
        ("1", "active", "running"), ("2", "active", "running")]
    assert all(i["pid"] > 0 and i["memory_bytes"] and i["uptime_s"] is not None for i in st["instances"])
    prom = clusterctl("status", NAME, "--prometheus", "--sandbox", s)
    assert f'clusterctl_workers{{cluster="{NAME}"}} 2\n' in prom
    for i in ("1", "2"):
        assert f'clusterctl_worker_up{{cluster="{NAME}",instance="{i}"}} 1.0\n' in prom
        assert re.search(rf'^clusterctl_worker_memory_bytes{{cluster="{NAME}",instance="{i}"}} [1-9][0-9]+$', prom, re.M)
        assert f'clusterctl_worker_restarts_total{{cluster="{NAME}",instance="{i}"}} 0\n' in prom
    table = clusterctl("status", NAME, "--sandbox", s)
    assert re.search(r"^instance\s+pid\s+state\s+uptime\s+restarts\s+reloads\s+cpu\s+cpu%\s+memory\s+requests", table, re.M)

    # in-place reload (the default for units from this clusterctl) under load: 0 failed, counted per instance
    with Load(s, PORT) as load:
        out = clusterctl("reload", NAME, "--health-url", "/health", "--sandbox", s)
    assert load.result.errors == [] and load.result.ok >= 50
    assert f"{NAME}: in-place reload (systemctl reload): " in out, out
    assert re.search(rf"^{NAME}@1\.service: pid \d+ -> \d+ \(reloaded in place\)$", out, re.M), out
    st = json.loads(clusterctl("status", NAME, "--json", "--sandbox", s))
    assert [(i["reloads"], i["restarts"]) for i in st["instances"]] == [(1, 0), (1, 0)]
    assert all(i["last_reload"] for i in st["instances"])
    prom = clusterctl("status", NAME, "--prometheus", "--sandbox", s)
    assert f'clusterctl_worker_reloads_total{{cluster="{NAME}",instance="2"}} 1\n' in prom
    assert re.search(r"^\s*1\s+\d+\s+active/running\s+\S+\s+0\s+1 \(\d+s ago\)",
                     clusterctl("status", NAME, "--sandbox", s), re.M)

    # rolling restart under load: 0 failed, and each instance READY before the next one stops
    mark = cursor(sd)
    with Load(s, PORT) as load:
        out = clusterctl("reload", NAME, "--how", "restart", "--health-url", "/health", "--sandbox", s)
    assert load.result.errors == [] and load.result.ok >= 50
    assert f"{NAME}@3.service: new code READY (surge instance" in out
    assert f"{NAME}: 2/2 instances on the new code" in out
    events = journal_events(sd, mark)

    def when(unit: str, verb: str) -> int:
        hits = [t for t, u, m in events if u == f"{NAME}@{unit}.service" and m.startswith(verb)]
        assert hits, (unit, verb, events)
        return hits[0]

    assert when("3", "Started") < when("1", "Stopping")   # the surge is READY before any old one stops
    assert when("1", "Started") < when("2", "Stopping")   # one at a time, READY before the next
    assert when("2", "Started") < when("3", "Stopping")   # the surge leaves last

    # scale 2 -> 4 -> 1 under load: 0 failed, and the count survives a reboot (the target's Wants=)
    with Load(s, PORT) as load:
        assert "4 workers (was 2)" in clusterctl("scale", NAME, "4", "--sandbox", s)
        load.wait_for(load.result.total + 40)
        assert "1 workers (was 4)" in clusterctl("scale", NAME, "1", "--sandbox", s)
        load.wait_for(load.result.total + 40)
    assert load.result.errors == [] and load.result.ok >= 80
    target = sd.path(f"/etc/systemd/system/{NAME}.target").read_text()
    assert re.findall(r"^Wants=.*$", target, re.M) == [f"Wants={NAME}.socket", f"Wants={NAME}@1.service"]
    st = json.loads(clusterctl("status", NAME, "--json", "--sandbox", s))
    assert [i["instance"] for i in st["instances"] if i["state"] == "active"] == ["1"]
    assert "+K or -K" in clusterctl("scale", NAME, "many", "--sandbox", s, ok=False)
    assert clusterctl("scale", NAME, "+1", "--sandbox", s).strip().endswith("2 workers (was 1)")
    assert json.loads(sd.path(f"/etc/systemd/system/{NAME}.plan.json").read_text())["workers"] == 2  # re-rendered

    # logs from every instance that ran, merged, each prefixed with its instance
    out = clusterctl("logs", NAME, "-n", "400", "--sandbox", s)
    prefixes = set(re.findall(rf"^\s*(\d+)\|{NAME} ", out, re.M))
    assert {"1", "2", "3", "4"} <= prefixes, out[-2000:]
    lines = [json.loads(x) for x in clusterctl("logs", NAME, "-n", "5", "--json", "--sandbox", s).splitlines()]
    assert lines and all({"instance", "time", "message"} <= set(x) for x in lines)
    assert [x["time"] for x in lines] == sorted(x["time"] for x in lines)

    # uninstall leaves nothing: no unit files, no manifest, no units loaded
    out = clusterctl("uninstall", NAME, "--sandbox", s)
    assert out.count("removed ") == 4  # the three units and the plan file beside them
    assert not list(sd.path("/etc/systemd/system").glob(f"{NAME}*"))
    assert not sd.path(f"/var/lib/clusterctl/{NAME}.json").exists()
    assert [u for u in sd.list_units(f"{NAME}*") if "not-found" not in u] == []
    assert "not installed" in clusterctl("status", NAME, "--sandbox", s, ok=False)


def test_reload_aborts_on_broken_release_leaving_old_code(sandbox: sb.Sandbox, tmp_path: Path) -> None:
    """A release that fails to import never replaces a running worker (the surge instance catches it)."""
    s = sandbox.name
    app = tmp_path / "app"
    app.mkdir()
    (app / "relapp.py").write_text("def app(environ, start_response):\n"
                                   "    start_response('200 OK', [])\n    return [b'v1']\n")
    out = tmp_path / "relapp"
    clusterctl("generate", "--app", "relapp:app", "--name", "relapp", "--workers", "2", "--listen", "127.0.0.1:8210",
               "--working-dir", str(app), "--python", sys.executable, "--output", str(out),
               *user_args(app))
    sb.exec(s, ["mkdir", "-p", str(app)])
    sd = Systemd(sandbox=s)
    # the app dir lives in the sandbox's own tree: copy the release in
    sd.path(app / "relapp.py").write_text((app / "relapp.py").read_text())
    clusterctl("install", str(out), "--start", "--sandbox", s)
    try:
        pids = [r["MainPID"] for r in sd.show(["relapp@1.service", "relapp@2.service"], ("MainPID",))]
        sd.path(app / "relapp.py").write_text("raise ImportError('release 2 is broken')\n")
        result = CliRunner().invoke(cli, ["reload", "relapp", "--how", "restart", "--sandbox", s, "--timeout", "20"])
        assert result.exit_code != 0
        assert "all 2 instances still run the old code" in result.output
        # the same in place: the first instance's new process fails to import, the other is not even tried
        result = CliRunner().invoke(cli, ["reload", "relapp", "--sandbox", s])
        assert result.exit_code != 0
        assert re.search(r"in-place reload failed: relapp@\d: reload failed: the new process \(pid \d+\) failed: "
                         r"importing 'relapp' raised ImportError: release 2 is broken.*0 instance\(s\) run the new "
                         r"code, the others still run the old code", result.output), result.output
        assert [r["MainPID"] for r in sd.show(["relapp@1.service", "relapp@2.service"], ("MainPID",))] == pids
        assert sd.show(["relapp@3.service"], ("ActiveState",))[0]["ActiveState"] == "inactive"
        with sb.netns(s):
            from tests.loadgen import request
            assert request(8210, "/") == (200, b"v1")
    finally:
        clusterctl("uninstall", "relapp", "--sandbox", s)
