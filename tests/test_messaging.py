"""Messaging without systemd: encoding and limits, the state file, a worker's Inbox on a real datagram
socket and event loop, the periodic task, and `generate --every/--task` (rendered, verified, bad input)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clusterctl import messaging, worker
from clusterctl.cli import cli
from clusterctl.control import generate as gen
from clusterctl.control.plan import build_plan, dynamic_user_name, timespan_seconds
from clusterctl.worker import task
from clusterctl.worker.inbox import Inbox

REPO = Path(__file__).resolve().parent.parent
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@pytest.fixture(autouse=True)
def clean_api() -> Iterator[None]:
    """Each test starts with no handlers and an empty worker.state."""
    saved = list(worker._handlers)
    worker._handlers.clear()
    worker._set_state({})
    yield
    worker._handlers[:] = saved
    worker._set_state({})


# --- encoding and limits ------------------------------------------------------------------------------

def test_encode_is_compact_json_of_an_object() -> None:
    assert messaging.encode({"usersCount": 42, "name": "é"}) == '{"usersCount":42,"name":"é"}'.encode()


@pytest.mark.parametrize("bad, why", [([1, 2], "JSON object"), (42, "JSON object"), ({"x": {1, 2}}, "not JSON-serialisable"),
                                      ({"x": float("nan")}, "not JSON-serialisable")])
def test_encode_refuses_what_is_not_a_json_object(bad: Any, why: str) -> None:
    with pytest.raises(messaging.MessageError, match=why):
        messaging.encode(bad)


def test_size_limit_is_exact() -> None:
    overhead = len(messaging.encode({"k": ""}))
    assert len(messaging.encode({"k": "x" * (messaging.MAX_MESSAGE - overhead)})) == messaging.MAX_MESSAGE
    with pytest.raises(messaging.MessageError, match=r"more than the limit of 65536"):
        messaging.encode({"k": "x" * (messaging.MAX_MESSAGE - overhead + 1)})


@pytest.mark.parametrize("text, why", [("{not json", "not valid JSON"), ("[1]", "JSON object"), ("", "not valid JSON"),
                                       ('"x"', "JSON object"), ("x" * 300_000, "more than the limit")])
def test_parse_says_why(text: str, why: str) -> None:
    with pytest.raises(messaging.MessageError, match=why):
        messaging.parse(text)


@pytest.mark.parametrize("datagram", [b"{", b"[]", b'{"kind":"other","data":{}}', b'{"kind":"send","data":1}',
                                      b"x" * (messaging.MAX_MESSAGE + 100)])
def test_decode_rejects_malformed(datagram: bytes) -> None:
    with pytest.raises(ValueError):
        messaging.decode(datagram)


# --- the state file -----------------------------------------------------------------------------------

def test_state_merges_atomically_and_privately(tmp_path: Path) -> None:
    assert messaging.load_state(tmp_path) == {}
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        messaging.save_state(fd, {"a": 1, "b": 2})
        assert messaging.save_state(fd, {"b": 3}) == {"a": 1, "b": 3}
    finally:
        os.close(fd)
    assert messaging.load_state(tmp_path) == {"a": 1, "b": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600


def test_broken_state_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state.json").write_text("{half")
    with caplog.at_level(logging.WARNING, "clusterctl.messaging"):
        assert messaging.load_state(tmp_path) == {}
    assert "ignoring" in caplog.text


# --- the worker side, on a real socket and event loop ------------------------------------------------------

def pump(loop: asyncio.AbstractEventLoop, seconds: float = 0.05) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_broadcast_reaches_the_inbox_and_updates_state(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    got: list[dict[str, Any]] = []
    worker.on_message(got.append)  # registered before any runtime exists, as an app does at import
    inbox = Inbox(tmp_path, "1")
    inbox.attach(loop)
    try:
        assert (tmp_path / "worker-1.sock").stat().st_mode & 0o777 == 0o600
        d = messaging.deliver(tmp_path, {"usersCount": 42}, expected=["1", "2"])
        assert d.received == ["1"] and d.missed == {"2": "not running"}
        assert "received by 1/2 instance(s): 1; not received by 2 (not running)" in d.summary("web")
        pump(loop)
        assert got == [{"usersCount": 42}]
        assert dict(worker.state) == {"usersCount": 42}
        snap = worker.state.snapshot()
        messaging.deliver(tmp_path, {"other": True})
        pump(loop)
        assert dict(worker.state) == {"usersCount": 42, "other": True}  # broadcasts merge key by key
        assert dict(snap) == {"usersCount": 42}  # a snapshot never changes under a reader
        with pytest.raises(TypeError):
            worker.state["x"] = 1  # type: ignore[index]
        # send: handlers only, not the state, not saved
        assert messaging.deliver(tmp_path, {"ping": 1}, instance="1").received == ["1"]
        pump(loop)
        assert got[-1] == {"ping": 1} and "ping" not in worker.state
        assert "ping" not in messaging.load_state(tmp_path)
    finally:
        inbox.close()
    assert not (tmp_path / "worker-1.sock").exists()


def test_bad_messages_and_failing_handlers_are_logged_and_dropped(tmp_path: Path, loop: asyncio.AbstractEventLoop,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    good: list[dict[str, Any]] = []

    def boom(message: dict[str, Any]) -> None:
        raise RuntimeError("app bug")

    worker.on_message(boom)
    worker.on_message(good.append)
    inbox = Inbox(tmp_path, "1")
    inbox.attach(loop)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, caplog.at_level(logging.WARNING):
            s.sendto(b"not json", str(tmp_path / "worker-1.sock"))
            s.sendto(b'{"kind":"broadcast","data":[1]}', str(tmp_path / "worker-1.sock"))
            s.sendto(b"{" * (messaging.MAX_MESSAGE + 200), str(tmp_path / "worker-1.sock"))
            pump(loop)
            messaging.deliver(tmp_path, {"ok": 1})
            pump(loop)
        assert caplog.text.count("dropped a bad message") == 3
        assert "raised" in caplog.text and "app bug" in caplog.text
        assert good == [{"ok": 1}]  # the next handler and the next message still run
        assert dict(worker.state) == {"ok": 1}
    finally:
        inbox.close()


def test_start_loads_saved_state_before_serving(tmp_path: Path, loop: asyncio.AbstractEventLoop,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that starts after a broadcast: the state file, then handlers once, then the socket.
    A stale socket of a previous process is replaced."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(tmp_path / "worker-3.sock"))
    stale.close()
    assert messaging.deliver(tmp_path, {"usersCount": 7}, expected=["3"]).missed == {"3": "not running"}
    got: list[dict[str, Any]] = []
    worker.on_message(got.append)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    inbox = Inbox.start(loop, "3")
    assert inbox is not None
    try:
        assert dict(worker.state) == {"usersCount": 7} and got == [{"usersCount": 7}]
        assert messaging.deliver(tmp_path, {"usersCount": 8}).received == ["3"]
        pump(loop)
        assert worker.state["usersCount"] == 8
    finally:
        inbox.close()


def test_messaging_is_off_without_a_runtime_directory(loop: asyncio.AbstractEventLoop,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert Inbox.start(loop, "1") is None


def test_deliver_through_a_path_longer_than_sun_path(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    """A sandbox's /proc/PID/root/run/NAME can pass 108 bytes: sending goes through the directory's fd."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    short = tmp_path / "s"
    short.symlink_to(deep)
    inbox = Inbox(short, "1")  # bound through a short path, reached through the long one
    inbox.attach(loop)
    try:
        assert len(str(deep / "worker-1.sock")) > 108
        assert messaging.deliver(deep, {"x": 1}).received == ["1"]
    finally:
        inbox.close()


def test_deliver_without_runtime_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="runtime directory"):
        messaging.deliver(tmp_path / "missing", {"x": 1})


def test_remove_runtime_dir_follows_the_dynamic_user_symlink(tmp_path: Path) -> None:
    (tmp_path / "private/web").mkdir(parents=True)
    (tmp_path / "private/web/state.json").write_text("{}")
    (tmp_path / "web").symlink_to("private/web")
    messaging.remove_runtime_dir(tmp_path / "web")
    assert not (tmp_path / "web").exists() and not (tmp_path / "private/web").exists()


# --- the periodic task ---------------------------------------------------------------------------------

@pytest.fixture
def taskmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tasks_mod.py").write_text(
        "import asyncio\n"
        "def count():\n    return {'usersCount': 3}\n"
        "async def acount():\n    await asyncio.sleep(0)\n    return {'usersCount': 4}\n"
        "def number():\n    return 5\n"
        "def fails():\n    raise RuntimeError('db down')\n"
        "NOT_CALLABLE = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_task_broadcasts_its_result(taskmod: Path, tmp_path: Path, loop: asyncio.AbstractEventLoop,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    inbox = Inbox(rundir, "1")
    inbox.attach(loop)
    try:
        assert task.main(["--name", "web", "--task", "tasks_mod:count", "--runtime-dir", str(rundir)]) == 0
        pump(loop)
        assert worker.state["usersCount"] == 3
        assert "received by 1/1" in capsys.readouterr().out
        assert task.run_task("tasks_mod:acount") == {"usersCount": 4}  # async functions are awaited
    finally:
        inbox.close()
    assert messaging.load_state(rundir) == {"usersCount": 3}


def test_task_result_must_be_a_json_object(taskmod: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert task.main(["--name", "web", "--task", "tasks_mod:number", "--runtime-dir", str(tmp_path)]) == 1
    assert "tasks_mod:number returned int '5'" in capsys.readouterr().err
    assert not (tmp_path / "state.json").exists()
    with pytest.raises(RuntimeError, match="db down"):  # a failing task fails the unit with its traceback
        task.run_task("tasks_mod:fails")


# --- generate --every/--task ------------------------------------------------------------------------------

def plan_kw(**kw: Any) -> dict[str, Any]:
    return {"app": "examples.users:app", "name": "users", "workers": "2", "python": sys.executable,
            "working_dir": str(REPO), "check": False, **kw}


def test_task_units_render() -> None:
    files = gen.render(build_plan(**plan_kw(every="10s", task="examples.users:count_users")))
    assert sorted(files) == ["users-task.service", "users-task.timer", "users.plan.json", "users.socket", "users.target",
                            "users@.service"]
    timer, svc, target = files["users-task.timer"], files["users-task.service"], files["users.target"]
    assert "OnUnitActiveSec=10s\n" in timer and "OnActiveSec=0\n" in timer and "Unit=users-task.service\n" in timer
    assert "PartOf=users.target\n" in timer
    assert "Wants=users-task.timer\n" in target
    assert "Type=oneshot\n" in svc and "-m clusterctl.worker.task --name users --task examples.users:count_users" in svc
    worker_svc = files["users@.service"]
    for line in ("DynamicUser=yes", "User=clusterctl-users", "RuntimeDirectory=users", "RuntimeDirectoryMode=0700",
                 "RuntimeDirectoryPreserve=yes", "ProtectSystem=strict", "MemoryDenyWriteExecute=yes", "UMask=0077",
                 "SyslogIdentifier=users-task", f"WorkingDirectory={REPO}"):
        assert line in svc.splitlines()
        if not line.startswith("Syslog"):
            assert line in worker_svc.splitlines()  # same user, directory and sandboxing as the workers
    assert "--every 10s --task examples.users:count_users" in files["users.target"].splitlines()[1]
    assert not any(n.startswith("users-task") for n in gen.render(build_plan(**plan_kw())))


def test_user_replaces_the_dynamic_user_in_the_task_too() -> None:
    svc = gen.render(build_plan(**plan_kw(every="1min", task="examples.users:count_users", user="www-data")))
    assert "User=www-data" in svc["users-task.service"] and "DynamicUser=yes" not in svc["users-task.service"]


@needs_analyze
def test_task_units_verify_and_stale_ones_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "users"
    gen.write(build_plan(**plan_kw(every="1s", task="examples.users:count_users", check=True)), out)  # verify: no output
    assert (out / "users-task.timer").is_file()
    result = gen.write(build_plan(**plan_kw()), out, force=True)
    assert sorted(p.name for p in result.removed) == ["users-task.service", "users-task.timer"]


@pytest.mark.parametrize("args, message", [
    (["--every", "10s"], "--every and --task go together"),
    (["--task", "examples.users:count_users"], "--every and --task go together"),
    (["--every", "10 parsecs", "--task", "examples.users:count_users"], "--every '10 parsecs' is not a time span"),
    (["--every", "500ms", "--task", "examples.users:count_users"], "shorter than 1s"),
    (["--every", "10s", "--task", "examples.users"], "is not MODULE:FUNC"),
    (["--every", "10s", "--task", "examples.users:nope"], "--task examples.users:nope: module examples.users has no attribute"),
    (["--every", "10s", "--task", "examples.nope:f"], "--task examples.nope:f: module"),
])
def test_bad_task_options_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(cli, ["generate", "--app", "examples.users:app", "--name", "users", "--workers", "1",
                                 "--working-dir", str(REPO), "--output", str(tmp_path / "out"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("span, seconds", [("10s", 10), ("5min", 300), ("1h 30min", 5400), ("2", 2), ("1.5s", 1.5),
                                           ("1w", 604800), ("250ms", 0.25)])
def test_timespan(span: str, seconds: float) -> None:
    assert timespan_seconds(span) == seconds


@pytest.mark.parametrize("span", ["", "s", "10 parsecs", "-1s", "1e3s"])
def test_bad_timespan(span: str) -> None:
    with pytest.raises(ValueError):
        timespan_seconds(span)


def test_dynamic_user_name_is_one_systemd_accepts() -> None:
    assert dynamic_user_name("hello") == "clusterctl-hello"
    assert dynamic_user_name("users") != "users"  # Debian's `users` group: a dynamic user cannot take that name
    for name in ("My.App", "1abc", "a" * 40, "x.y", "a" * 21):
        user = dynamic_user_name(name)
        assert len(user) <= 31 and user[0].isalpha() and user == user.lower() and "." not in user
    assert dynamic_user_name("x.y") != dynamic_user_name("x-y")


# --- the CLI checks the message before it looks for the cluster ----------------------------------------

@pytest.mark.parametrize("cmd", [["broadcast", "web"], ["send", "web", "1"]])
@pytest.mark.parametrize("text, why", [("{bad", "not valid JSON"), ("[1]", "JSON object"),
                                       (json.dumps({"k": "x" * 70000}), "more than the limit")])
def test_cli_rejects_bad_messages_before_sending(cmd: list[str], text: str, why: str) -> None:
    r = CliRunner().invoke(cli, [*cmd, text, "--sandbox", "no-such-sandbox"])
    assert r.exit_code == 2 and "nothing sent" in r.output and why in r.output, r.output


def test_api_is_there_before_the_runtime() -> None:
    assert isinstance(worker.instance, str) and len(worker.state) == 0
    with pytest.raises(TypeError):
        worker.on_message(42)  # type: ignore[arg-type]


# --- a full file system (/run full): the saved state, never the workers --------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only; mounted on the host, unmounted in teardown), as /run is when it is full."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "small", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    assert shutil.disk_usage(directory).free == 0


def test_state_on_a_full_fs_fails_cleanly_and_keeps_the_old_state(small_fs: Path) -> None:
    fd = os.open(small_fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        messaging.save_state(fd, {"a": 1})
        fill(small_fs)
        with pytest.raises(OSError) as e:
            messaging.save_state(fd, {"big": "y" * 20000})  # more than any partial write can take
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert messaging.load_state(small_fs) == {"a": 1}  # whole, not a truncated new one
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "state.json"]  # no temporary file left


def test_state_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A nearly full file system takes part of a write; the rest must follow, or the write must fail."""
    real = os.write
    monkeypatch.setattr(messaging.os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        messaging.save_state(fd, {"key": "value" * 100})
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert messaging.load_state(tmp_path) == {"key": "value" * 100}


def test_broadcast_on_a_full_fs_reaches_running_workers_and_says_it_was_not_saved(
        small_fs: Path, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox(small_fs, "1")  # the worker binds its socket while there is room
    inbox.attach(loop)
    try:
        assert messaging.deliver(small_fs, {"v": 1}).not_saved == ""
        fill(small_fs)
        with caplog.at_level(logging.WARNING, "clusterctl.messaging"):
            delivery = messaging.deliver(small_fs, {"v": 2, "pad": "z" * 20000})
        pump(loop)
        assert worker.state["v"] == 2  # the running worker got it
        assert delivery.received == ["1"] and "No space left on device" in delivery.not_saved
        assert "NOT saved as state" in delivery.summary("web") and "broadcast not saved as state" in caplog.text
        assert messaging.load_state(small_fs) == {"v": 1}  # a worker starting later loads the last saved state
    finally:
        inbox.close()


def test_task_fails_when_its_result_cannot_be_saved(taskmod: Path, small_fs: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fill(small_fs)
    (taskmod / "tasks_big.py").write_text("def big():\n    return {'pad': 'z' * 20000}\n")
    assert task.main(["--name", "web", "--task", "tasks_big:big", "--runtime-dir", str(small_fs)]) == 1
    assert "NOT saved as state (cannot write" in capsys.readouterr().err


def test_cli_broadcast_not_saved_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    from clusterctl.cli import messaging as cli_messaging
    from clusterctl.control import delivery as control

    delivery = messaging.Delivery("broadcast", 7, received=["1", "2"],
                                  not_saved="cannot write /run/web/state.json: No space left on device")
    monkeypatch.setattr(cli_messaging, "locate", lambda name, sandbox, user, doing: None)
    monkeypatch.setattr(control, "deliver", lambda sd, name, msg, instance: delivery)
    r = CliRunner().invoke(cli, ["broadcast", "web", '{"a": 1}'])
    assert r.exit_code == 2, r.output
    assert "received by 2/2 instance(s): 1, 2; NOT saved as state (cannot write /run/web/state.json: No space" in r.output
    assert "df -h /run" in r.output
