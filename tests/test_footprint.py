"""What a running worker carries: the set of modules it imported, checked from outside (no byte counts, no
timings: those vary by machine; `bench/footprint.py` measures the bytes). Every module here is resident in
every worker of every cluster, so the serving path must not pull in the CLI, the unit templates or
anything only a rare path needs.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from clusterctl.worker import options as worker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import footprint  # noqa: E402

SSA = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"

# Never in a serving worker: the CLI and what only it needs, modules only a rare path needs (they are
# imported there, lazily), and what the worker replaced with something lighter.
NEVER = {
    "click", "jinja2", "markupsafe",                                     # the CLI, the unit templates
    "wsproto", "h11",                                                    # WebSockets: only once one is upgraded
    "clusterctl.cli", "clusterctl.control.plan", "clusterctl.control.generate", "clusterctl.control.ops",
    "clusterctl.control.systemd", "clusterctl.control.sandbox", "clusterctl.control.deploy", "clusterctl.control.cores",
    "clusterctl.proc", "clusterctl.worker.task",
    "argparse", "shutil", "gettext",          # the worker's own command line is parsed without argparse
    "pathlib", "json",                        # messaging: json only once a message or saved state arrives
    "systemd.journal", "systemd._reader", "systemd.id128", "uuid", "datetime",  # accesslog.py speaks journald's socket itself
    "email", "http.client", "logging.handlers", "urllib.request",
    "random",                                 # only with --max-requests
}


@pytest.mark.skipif(not os.path.exists(SSA), reason="systemd-socket-activate not installed")
@pytest.mark.parametrize("mode", ["socket-activate", "bind"])
def test_serving_worker_imports_only_the_serving_path(mode: str) -> None:
    r = footprint.measure(mode=mode, requests=3, settle=0.0, modules=True)
    mods = set(r["modules"])
    assert {"clusterctl.http.wsgi", "clusterctl.worker.runtime", "uvloop", "httptools"} <= mods  # it did serve
    assert "systemd.daemon" in mods if mode == "socket-activate" else True
    assert not NEVER & mods, f"a serving worker imported {sorted(NEVER & mods)}"
    assert not {m for m in mods if m.startswith(("click.", "jinja2.", "email.", "clusterctl.cli."))}
    # `python -m clusterctl.worker` runs the module apps import; it does not define everything twice.
    assert "WorkerConfig" not in r["main_names"] and "OPTIONS" not in r["main_names"]


def test_threads_pool_only_with_threads() -> None:
    r = footprint.measure(mode="bind", requests=2, settle=0.0, modules=True)
    assert r["threads"] == 2  # the event loop and the monitor (watchdog.py); no pool thread, no executor
    r = footprint.measure(mode="bind", requests=2, settle=0.0, modules=True, extra=["--threads", "2"])
    assert r["threads"] >= 3


# --- the command line: the plain parser gives argparse's values, or leaves the input to argparse --------

def _argparse_values(argv: list[str]) -> dict[str, Any] | None:
    """What argparse makes of argv, or None where it exits (help, errors)."""
    try:
        return dataclasses.asdict(worker._parse_argparse(argv))
    except SystemExit:
        return None


def _exec_start_argv() -> list[str]:
    line = next(x for x in (REPO / "units/hello/hello@.service").read_text().splitlines()
                if x.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart=").replace("%i", "1"))
    assert argv[1:3] == ["-m", "clusterctl.worker"]
    return argv[3:]


CASES = [
    _exec_start_argv(),
    ["--app", "a:b"],
    ["--app=a:b", "--bind", "127.0.0.1:1", "--bind=unix:/x", "--no-access-log", "--journal", "--threads", "4"],
    ["--app", "a:b", "--drain-timeout", "2.5", "--max-requests=10", "--max-requests-jitter", "3", "--loop", "asyncio"],
    ["--app", "a:b", "--access-log", "--no-access-log", "--app", "c:d"],              # last one wins
    ["--app", "a:b", "--name", "x=y", "--interface", "asgi", "--keepalive-timeout", "1e1"],
    ["--app", "a:b", "--ws-ping-interval", "0", "--ws-ping-timeout=2.5", "--no-ws-per-message-deflate",
     "--ws-max-size", "1024"],
    ["--app", "a:b", "--max-requests", "-1"],              # negative numbers: argparse's rules
    ["--app", "a:b", "--drain", "3"],                       # abbreviation: argparse
    ["--app", "a:b", "--threads", "x"],                     # error: argparse's message
    ["--app", "a:b", "--threads"],
    ["--app", "a:b", "--journal=yes"],
    ["--app", "a:b", "stray"],
    ["--app", "a:b", "--", "--x"],
    ["--app="],
    ["--bind", "x:1"],                                       # --app missing
    ["-h"],
]


@pytest.mark.parametrize("argv", CASES)
def test_plain_parser_agrees_with_argparse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    plain = worker._parse_plain(argv)
    if plain is not None:  # anything it accepts, argparse accepts with the same values
        assert dataclasses.asdict(worker.WorkerConfig(**plain)) == _argparse_values(argv)


def test_plain_parser_takes_the_units_command_line() -> None:
    argv = _exec_start_argv()
    assert worker._parse_plain(argv) is not None
    assert worker._parse_plain([*argv, "--threads", "4", "--bind", "127.0.0.1:0", "--no-access-log"]) is not None
