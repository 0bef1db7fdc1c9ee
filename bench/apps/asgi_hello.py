"""ASGI hello world, the same response as examples/hello.py, for the per-core ASGI benchmark."""

from __future__ import annotations

from typing import Any

BODY = b"Hello, world!\n"
HEAD = {"type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(HEAD)
    await send({"type": "http.response.body", "body": BODY})
