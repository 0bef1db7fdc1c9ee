"""A release whose import takes a while, as a real project's does (Django, FastAPI + an ORM: about a second).

`SLOWSTART_SECONDS` (default 1) is slept at import. Serves examples.hello's endpoints, plus `/release`
(`RELEASE`, from the unit's Environment=, so a reload after `clusterctl install` shows it changed) and
`/state` (this worker's pid and its merged broadcasts, as JSON). For rolling-deploy tests and demos:
`systemctl reload 'NAME@*'` against `systemctl restart 'NAME@*'`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from clusterctl import worker
from examples import hello

time.sleep(float(os.environ.get("SLOWSTART_SECONDS", "1")))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/release":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{os.environ.get('RELEASE', 'v1')} {os.getpid()}\n".encode()]
    if path == "/state":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"pid": os.getpid(), "state": dict(worker.state)}).encode()]
    return hello.app(environ, start_response)
