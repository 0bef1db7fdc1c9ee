"""A FastAPI app, unchanged from how FastAPI's docs write one, served by the real worker under
systemd-socket-activate (real fd passing) with a real AF_UNIX notify socket (tests/test_runtime.py plays
systemd): JSON, request bodies, streaming, background tasks, a WebSocket, lifespan before READY=1, and the
messaging API (`worker.on_message`, sync and async, and `worker.state`) from an ASGI app."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clusterctl import messaging
from tests.workerproc import Worker, assert_fails_before_ready, connect_when_listening

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from websockets.asyncio.client import connect  # noqa: E402

FASTAPI_APP = '''
import asyncio, contextlib, os, time
from fastapi import BackgroundTasks, FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from clusterctl import worker

received = []

@worker.on_message
def remember(message):
    received.append({"sync": message})

@worker.on_message
async def remember_later(message):   # an async handler: may await without blocking the loop
    await asyncio.sleep(0.5)
    received.append({"async": message})

@contextlib.asynccontextmanager
async def lifespan(app):
    await asyncio.sleep(float(os.environ.get("STARTUP_DELAY", "0")))
    if os.environ.get("FAIL_STARTUP"):
        raise RuntimeError("cache warm-up failed")
    app.state.started = time.time()
    yield

app = FastAPI(lifespan=lifespan)

class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []

@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None):
    return {"item_id": item_id, "q": q}

@app.post("/items")
async def create_item(item: Item):
    return {"name": item.name.upper(), "total": item.price * 2, "tags": item.tags}

@app.get("/stream")
async def stream():
    async def gen():
        for i in range(3):
            yield f"part {i}\\n"
            await asyncio.sleep(0.01)
    return StreamingResponse(gen(), media_type="text/plain")

def write_mark(text: str) -> None:
    with open(os.environ["BG_MARK"], "w") as f:
        f.write(text)

@app.post("/bg")
async def bg(tasks: BackgroundTasks):
    tasks.add_task(write_mark, "background ran")
    return {"queued": True}

@app.get("/messages")
async def messages():
    return {"state": dict(worker.state), "received": received, "instance": worker.instance}

@app.websocket("/ws")
async def ws_echo(ws: WebSocket):
    await ws.accept()
    try:
        while True:
            data = await ws.receive_json()
            await ws.send_json({"echo": data, "instance": worker.instance})
    except WebSocketDisconnect:
        pass
'''


def start(spawn: Callable[..., Worker], tmp_path: Path, **env: str) -> Worker:
    (tmp_path / "fapp.py").write_text(FASTAPI_APP)
    (tmp_path / "run").mkdir(exist_ok=True)
    return spawn("--app", "fapp:app", "--no-access-log", "--instance", "1", cwd=tmp_path,
                 env={"BG_MARK": str(tmp_path / "bg"), "RUNTIME_DIRECTORY": str(tmp_path / "run"), **env})


def test_fastapi_app_through_socket_activation(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    w = start(spawn, tmp_path, STARTUP_DELAY="0.6")
    first = connect_when_listening(w.port)
    t0 = time.monotonic()
    t_ready, _ = w.notify.wait_for("READY=1")
    assert t_ready - t0 >= 0.5, "READY=1 came before lifespan startup completed"
    first.close()
    with httpx.Client(base_url=f"http://127.0.0.1:{w.port}", timeout=5) as c:
        assert c.get("/items/7", params={"q": "x"}).json() == {"item_id": 7, "q": "x"}
        r = c.post("/items", json={"name": "book", "price": 2.5, "tags": ["a"]})
        assert r.status_code == 200 and r.json() == {"name": "BOOK", "total": 5.0, "tags": ["a"]}
        assert c.post("/items", json={"name": "no price"}).status_code == 422  # FastAPI's validation
        r = c.get("/stream")
        assert r.text == "part 0\npart 1\npart 2\n" and r.headers["transfer-encoding"] == "chunked"
        assert c.post("/bg").json() == {"queued": True}
        deadline = time.monotonic() + 5
        while not (tmp_path / "bg").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "bg").read_text() == "background ran"
        assert c.get("/nope").status_code == 404

    async def ws() -> list[dict[str, object]]:
        async with connect(f"ws://127.0.0.1:{w.port}/ws") as s:
            out = []
            for i in range(3):
                await s.send(json.dumps({"n": i}))
                out.append(json.loads(await s.recv()))
            return out

    assert asyncio.run(ws()) == [{"echo": {"n": i}, "instance": "1"} for i in range(3)]
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 0


def test_messaging_from_a_fastapi_app(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    """Broadcasts reach `worker.state` and both handlers; the async one awaits while requests go on."""
    w = start(spawn, tmp_path)
    connect_when_listening(w.port).close()
    w.notify.wait_for("READY=1")
    delivery = messaging.deliver(tmp_path / "run", {"motd": "maintenance at 18:00"})
    assert delivery.received == ["1"], delivery
    with httpx.Client(base_url=f"http://127.0.0.1:{w.port}", timeout=5) as c:
        time.sleep(0.1)
        t0 = time.monotonic()
        got = c.get("/messages").json()
        assert time.monotonic() - t0 < 0.3, "the async handler blocked the loop"
        assert got["state"] == {"motd": "maintenance at 18:00"} and got["instance"] == "1"
        assert got["received"] == [{"sync": {"motd": "maintenance at 18:00"}}]  # the async one still sleeps
        time.sleep(0.6)
        assert c.get("/messages").json()["received"][1:] == [{"async": {"motd": "maintenance at 18:00"}}]
    os.kill(w.proc.pid, signal.SIGTERM)
    assert w.proc.wait(10) == 0
    _, err = w.output()
    assert "never awaited" not in err and "raised" not in err


def test_failing_startup_exits_nonzero(spawn: Callable[..., Worker], tmp_path: Path) -> None:
    assert_fails_before_ready(start(spawn, tmp_path, FAIL_STARTUP="1"), "cache warm-up failed")
