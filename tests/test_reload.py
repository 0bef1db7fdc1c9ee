"""The in-place reload's pieces without systemd: the helper's refusals (one line each, exit 1), the queue's
fail-fast marker, and which mechanism `clusterctl reload` picks after an install (a fake manager's files).
Under real systemd: tests/test_e2e_reload.py."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusterctl.control import rollout
from clusterctl.control.generate import render
from clusterctl.control.plan import build_plan
from clusterctl.errors import ClusterctlError
from clusterctl.worker import reload

WORKER = ["/usr/bin/python3", "-m", "clusterctl.worker", "--app", "m:app", "--name", "web", "--instance", "2"]


def run_helper(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = reload.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(("argv", "env", "says"), [
    (["--timeout", "60"], {}, "no worker command line after '--'"),
    (["--timeout", "soon", "--", *WORKER], {}, "--timeout must be a number of seconds"),
    (["--", "/usr/bin/python3", "-m", "clusterctl.worker", "--app", "m:app"], {}, "names no worker command line"),
    (["--", *WORKER], {"RUNTIME_DIRECTORY": ""}, "RUNTIME_DIRECTORY is unset"),
    (["--", *WORKER], {"MAINPID": ""}, "web@2 has no main process"),
])
def test_helper_refuses_bad_input_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, argv: list[str], env: dict[str, str], says: str) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("MAINPID", "4242")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, err = run_helper(capsys, argv)
    assert code == 1 and says in err and "(fix: " in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_helper_without_a_control_socket_says_restart_once(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("MAINPID", "4242")
    code, err = run_helper(capsys, ["--", *WORKER])
    assert code == 1 and "cannot reach pid 4242" in err and "systemctl restart web@2" in err
    assert not (tmp_path / reload.FAILED).exists()  # not the release's fault: the queue goes on


def test_queued_helper_fails_fast_after_a_failure_but_a_later_reload_tries(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("MAINPID", "4242")
    helper = reload.Helper(60, WORKER)  # started (queued) now
    helper.unit = "web@1"
    helper.mark_failed("importing 'm' raised ImportError: broken")  # the instance before it failed meanwhile
    with pytest.raises(reload.ReloadFailed, match=r"not tried: web@1 failed to reload onto the same release .*broken"):
        helper._check_queue()
    time.sleep(0.001)
    reload.Helper(60, WORKER)._check_queue()  # a reload started after the failure is tried again


def test_reload_counts_are_kept_per_instance(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("MAINPID", "4242")
    helper = reload.Helper(60, WORKER)
    assert helper._count() == 1 and helper._count() == 2
    counts = reload.read_json(str(tmp_path), reload.COUNTS)
    assert counts["2"]["count"] == 2 and abs(counts["2"]["last"] - time.time()) < 5
    assert oct(os.stat(tmp_path / reload.COUNTS).st_mode & 0o777) == "0o600"


# --- which mechanism ----------------------------------------------------------------------------------

@dataclass
class FakeSystemd:
    root: Path
    state_dir: str = "/var/lib/clusterctl"

    def path(self, p: str | Path) -> Path:
        return self.root / str(p).lstrip("/")


def unit(**kw: object) -> str:
    plan = build_plan(app="m:app", name="web", workers="2", check=False, **kw)  # type: ignore[arg-type]
    return render(plan)["web@.service"]


def choose(sd: FakeSystemd, text: str, **kw: object) -> tuple[str, str]:
    args: dict = {"how": "auto", "batch": "1", "pause": 0.0, **kw}
    return rollout.choose(sd, "web", text, {"web@1.service": "active", "web@2.service": "active"}, **args)  # type: ignore[arg-type]


def test_reload_picks_up_exec_start_and_environment_but_restarts_for_sandboxing(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path)
    old = unit()
    new = unit(env=["RELEASE=2"], worker_args=["--threads 4"])
    rollout.note_install(sd, "web", old, new)  # type: ignore[arg-type]
    assert choose(sd, new)[0] == "reload"
    limited = unit(env=["RELEASE=2"], worker_args=["--threads 4"], memory_max="1G")
    rollout.note_install(sd, "web", new, limited)  # type: ignore[arg-type]
    how, why = choose(sd, limited)
    assert how == "restart" and why == "MemoryMax changed, which only a restart applies"
    rollout.forget(sd, "web")  # type: ignore[arg-type]
    assert choose(sd, limited)[0] == "reload"


def test_units_without_exec_reload_are_restarted(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path)
    old = "\n".join(line for line in unit().splitlines() if not line.startswith("ExecReload="))
    assert choose(sd, old) == ("restart", "the installed units have no ExecReload= (generated by an older clusterctl)")
    with pytest.raises(ClusterctlError, match="no in-place reload"):
        choose(sd, old, how="reload")
    rollout.note_install(sd, "web", old, unit())  # type: ignore[arg-type]
    assert choose(sd, unit()) == ("restart", "the running workers were started from units without in-place reload")


def test_batches_and_stopped_instances_mean_restart(tmp_path: Path) -> None:
    sd = FakeSystemd(tmp_path)
    assert choose(sd, unit(), batch="2")[0] == "restart"
    how, why = rollout.choose(sd, "web", unit(), {"web@1.service": "failed"}, how="auto", batch="1",  # type: ignore[arg-type]
                              pause=0.0)
    assert how == "restart" and "web@1.service not running" in why
