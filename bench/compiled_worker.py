"""`python -m clusterctl.worker` with the compiled fast lane (issue 21), for bench_core's clusterctl-compiled.

Until the worker has its `--engine` option (the runtime picks the engine with clusterctl.http.fastlane.choose
at the merge of issue 21), this wraps the runtime's Server so that each one it builds gets the lane.
"""

from __future__ import annotations

import sys
from typing import Any

from clusterctl import runtime, worker
from clusterctl.http import fastlane


def _compiled(*args: Any, **kwargs: Any) -> Any:
    server = _server(*args, **kwargs)
    if not fastlane.install(server):
        raise SystemExit(f"compiled_worker: the fast lane does not apply: {fastlane.why_not()}")
    return server


_server = runtime.Server
runtime.Server = _compiled  # type: ignore[misc]

if __name__ == "__main__":
    sys.exit(worker.main())
