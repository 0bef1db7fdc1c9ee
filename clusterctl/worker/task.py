"""`python -m clusterctl.worker.task --name NAME --task MODULE:FUNC`: the periodic primary task.

NAME-task.timer starts NAME-task.service (oneshot) every --every; it runs this: call FUNC once (one
database call for the whole cluster instead of one per worker) and broadcast what it returns to every
worker, saving it as the state that workers starting later load. A new process per run, so a deploy's
new code is picked up at the next run. Any failure exits non-zero: the unit fails and the journal says why.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from typing import Any

from clusterctl import appspec, messaging


def load_func(spec: str) -> Any:
    """Import MODULE:FUNC with the working directory first on sys.path (WorkingDirectory= in the unit)."""
    return appspec.load(spec, os.getcwd(), option="--task", what="a function", example="myproject.tasks:count_users")


def run_task(spec: str) -> dict[str, Any]:
    """Call the task (awaiting it if it is async) and check that its result can be broadcast."""
    result = load_func(spec)()
    if inspect.isawaitable(result):
        result = asyncio.run(result)  # type: ignore[arg-type]
    try:
        messaging.encode(result)
    except messaging.MessageError as e:
        raise messaging.MessageError(f"{spec} returned {type(result).__name__} {str(result)[:80]!r}: {e}") from None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.worker.task",
                                     description="Run a periodic task once and broadcast its result to the workers.")
    parser.add_argument("--name", required=True, help="cluster name (RuntimeDirectory=NAME)")
    parser.add_argument("--task", required=True, metavar="MODULE:FUNC", help="function returning a JSON object")
    parser.add_argument("--runtime-dir", help="default: $RUNTIME_DIRECTORY (set by systemd), else /run/NAME")
    args = parser.parse_args(argv)
    directory = args.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or messaging.runtime_dir(args.name)
    try:
        message = run_task(args.task)
    except messaging.MessageError as e:
        print(f"clusterctl task: error: {e}", file=sys.stderr, flush=True)
        return 1
    # Anything else the task raises keeps its traceback in the journal and fails the unit (exit 1).
    try:
        delivery = messaging.deliver(directory, message)
    except OSError as e:
        print(f"clusterctl task: error: cannot broadcast through {directory}: {e}", file=sys.stderr, flush=True)
        return 1
    if delivery.not_saved:  # the running workers got it; fail the run so the journal and status say so
        print(f"clusterctl task: error: {delivery.summary(args.name)}", file=sys.stderr, flush=True)
        return 1
    print(delivery.summary(args.name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
