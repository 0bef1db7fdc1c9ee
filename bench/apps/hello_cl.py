"""examples/hello.py's "/" with its Content-Length set, for bjoern in bench_core.py.

Without one, bjoern answers HTTP/1.1 chunked in two sends on a socket without TCP_NODELAY, and every
keep-alive response waits out the client's delayed ACK (~1.1k req/s instead of ~60k here). Our engine
and granian add the Content-Length themselves, so this is the same response on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from examples.hello import HELLO

_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", _HEADERS)
    return [HELLO]
