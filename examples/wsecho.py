"""A raw ASGI app with a WebSocket echo, for the WebSocket tests, the e2e cluster test and bench/bench_ws.py.

HTTP: `/` says hello and which worker answered, `/health` says ok. WebSocket `/ws`: every text or binary
message comes back as it was sent; the text `whoami` is answered with the worker's pid and instance.
"""

from __future__ import annotations

import os
from typing import Any

from clusterctl import worker


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":
        body = b"ok\n" if scope["path"] == "/health" else f"hello from {os.getpid()} {worker.instance}\n".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if scope["path"] != "/ws":
        await send({"type": "websocket.close", "code": 1000})
        return
    await send({"type": "websocket.accept"})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") == "whoami":
            await send({"type": "websocket.send", "text": f"{os.getpid()} {worker.instance}"})
        elif msg.get("text") is not None:
            await send({"type": "websocket.send", "text": msg["text"]})
        else:
            await send({"type": "websocket.send", "bytes": msg["bytes"]})
