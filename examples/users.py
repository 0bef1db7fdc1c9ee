"""The seeds' usersCount example: the primary counts users once every 10 s and pushes the number to every
worker, instead of every worker (or every request) querying the database.

    clusterctl generate --app examples.users:app --name users --every 10s --task examples.users:count_users

`count_users()` runs in NAME-task.service (one process for the whole cluster, once per --every); what it
returns is broadcast and lands in `worker.state` of every worker, including workers that start later.
`/users` answers from memory: {"instance": "2", "usersCount": 42, "countedAt": ..., "state": {...},
"received": {...}}: `state` holds the broadcasts (every worker the same), `received` what this worker's
on_message handler got, `clusterctl send NAME I` messages included.

The "database" is SQLite at $USERS_DB (`SELECT COUNT(*) FROM users`); without it the call is simulated.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from clusterctl import worker

# Every message this worker's handler got (broadcasts and `clusterctl send` to it), merged key by key.
received: dict[str, Any] = {}


@worker.on_message
def remember(message: dict[str, Any]) -> None:
    """Runs on the event loop for every message: cheap, never blocks."""
    global received
    received = {**received, **message}  # a new dict: request threads never see one half-updated


def count_users() -> dict[str, Any]:
    """The periodic task: one database call for the whole cluster; the returned object is broadcast."""
    path = os.environ.get("USERS_DB")
    if path:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM users").fetchone()
    else:
        time.sleep(0.05)  # a simulated query
        count = 42
    return {"usersCount": count, "countedAt": time.time()}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/users":
        state = worker.state.snapshot()  # one consistent version for this request
        body = {"instance": worker.instance, "usersCount": state.get("usersCount"), "countedAt": state.get("countedAt"),
                "state": dict(state), "received": received}
        data = json.dumps(body).encode() + b"\n"
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]
    if environ["PATH_INFO"] == "/health":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
