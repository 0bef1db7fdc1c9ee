"""examples.hello plus `/modules`: the names in the worker's sys.modules, one per line, and `/main`: the
names defined in its __main__ module.

For bench/footprint.py and tests/test_footprint.py: what a running worker has imported, seen from
outside without adding anything to it (this module imports only sys and the example app).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from examples.hello import app as hello


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/modules":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["\n".join(sorted(sys.modules)).encode() + b"\n"]
    if environ["PATH_INFO"] == "/main":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["\n".join(sorted(vars(sys.modules["__main__"]))).encode() + b"\n"]
    return hello(environ, start_response)
