"""An ASGI cluster with WebSockets under a real systemd (the sandbox): 2 workers of examples/wsecho.py, 50 open
WebSockets and steady HTTP load through a rolling `clusterctl reload`. Every WebSocket on a leaving worker must
be closed with 1001 (going away) and reconnect, no HTTP request may fail, and no worker may be cut by the drain
deadline. The clients run inside the sandbox's network namespace (one thread, one event loop)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from clusterctl.cli import cli
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from tests.clusters import installed
from tests.loadgen import Load
from tests.worker_user import worker_user

REPO = Path(__file__).resolve().parent.parent
NAME = "wsdemo"
PORT = 8350  # not shared with the other e2e modules (8300: hardening, up)
CLIENTS = 50


class Clients:
    """CLIENTS WebSockets kept open (reconnecting after every close) from a thread in the sandbox's netns.

    Each sends `whoami` every 0.2 s and records the close codes it got and the pids that answered it."""

    def __init__(self, sandbox: str) -> None:
        self.sandbox = sandbox
        self.closes: list[list[int]] = [[] for _ in range(CLIENTS)]
        self.pids: list[list[str]] = [[] for _ in range(CLIENTS)]
        self.errors: list[str] = []
        self.open = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> Clients:
        self.thread.start()
        deadline = time.monotonic() + 15
        while self.open < CLIENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.open == CLIENTS, (self.open, self.errors)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(20)

    def _main(self) -> None:
        with sb.netns(self.sandbox):
            asyncio.run(self._all())

    async def _all(self) -> None:
        await asyncio.wait_for(asyncio.gather(*(self._client(i) for i in range(CLIENTS))), 120)

    async def _client(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                async with connect(f"ws://127.0.0.1:{PORT}/ws", open_timeout=10) as ws:
                    self.open += 1
                    try:
                        while not self.stop.is_set():
                            await ws.send("whoami")
                            self.pids[i].append((await ws.recv()).split()[0])  # type: ignore[union-attr]
                            await asyncio.sleep(0.2)
                    except ConnectionClosed as e:
                        self.closes[i].append(e.rcvd.code if e.rcvd else 1006)
                    finally:
                        self.open -= 1
            except OSError as e:  # TimeoutError included
                self.errors.append(f"client {i}: {type(e).__name__}: {e}")
                await asyncio.sleep(0.1)


def clusterctl(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_rolling_reload_with_websockets(sandbox: sb.Sandbox, tmp_path: Path) -> None:
    s = sandbox.name
    sd = Systemd(sandbox=s)
    with installed(sd, tmp_path / NAME, enable=True, app="examples.wsecho:app", name=NAME, workers="2",
                   listen=[f"127.0.0.1:{PORT}"], working_dir=str(REPO), python=sys.executable, user=worker_user(),
                   drain_timeout=10):
        old = {r["MainPID"] for r in sd.show([f"{NAME}@1.service", f"{NAME}@2.service"], ("MainPID",))}
        with Clients(s) as clients:
            # status: the open WebSockets per instance (STATUS= is sent about once a second)
            deadline = time.monotonic() + 5
            while True:
                st = json.loads(clusterctl("status", NAME, "--json", "--sandbox", s))
                counts = [i["websockets"] for i in st["instances"]]
                if sum(c or 0 for c in counts) == CLIENTS or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert sum(counts) == CLIENTS, counts
            table = clusterctl("status", NAME, "--sandbox", s)
            assert re.search(r"^instance\s+pid.*errors\s+websockets$", table, re.M), table
            t0 = time.monotonic()
            with Load(s, PORT) as load:
                out = clusterctl("reload", NAME, "--sandbox", s)
            took = time.monotonic() - t0
            assert f"{NAME}: 2/2 instances on the new code" in out
            new = {r["MainPID"] for r in sd.show([f"{NAME}@1.service", f"{NAME}@2.service"], ("MainPID",))}
            # after the reload every client is connected again and answered by a new worker
            time.sleep(1.0)
            assert clients.open == CLIENTS, clients.errors
            latest = {p[-1] for p in clients.pids}
        assert load.result.errors == [] and load.result.ok >= 50, load.result.errors[:5]
        assert new.isdisjoint(old) and latest <= {str(p) for p in new}, (latest, new)
        assert all(clients.closes), "a WebSocket on a replaced worker was never closed"
        assert {c for cl in clients.closes for c in cl} == {1001}, clients.closes
        assert clients.errors == []
        # each leaving worker drained in time: exit 0, no deadline, nothing killed by systemd
        log = sd.journalctl("-u", f"{NAME}@*", "-o", "cat")
        assert f"{NAME}: in-place reload (systemctl reload)" in out, out  # the default for these units
        assert log.count("exiting with 0") >= 2, log[-3000:]  # the replaced processes of @1 and @2
        assert "drain timeout" not in log and "exiting with 1" not in log
        assert not re.search(r"timed out|Killing process|status=9/KILL", sd.journalctl("-u", f"{NAME}@*")), log[-2000:]
        assert took < 40, took
