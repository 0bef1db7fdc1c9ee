"""The STATUS= line: what the runtime writes is what `clusterctl status` reads (clusterctl.statusline)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from clusterctl import statusline
from clusterctl.http import asgi
from clusterctl.worker import notify
from clusterctl.worker.runtime import Runtime


def test_round_trip_and_readable() -> None:
    text = statusline.format(state="draining", served=1204, in_flight=2, errors=0, connections=7, websockets=3)
    assert text == "state=draining served=1204 in_flight=2 errors=0 connections=7 websockets=3"
    assert statusline.parse(text) == {"served": 1204, "in_flight": 2, "errors": 0, "connections": 7, "websockets": 3}
    assert statusline.parse(statusline.format(in_flight=1, note="recycling: max=5 requests")) == {"in_flight": 1}
    assert statusline.parse("") == {} and statusline.parse("waiting for GET /ready to answer 2xx") == {}


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValueError, match="not a STATUS= field: served_total"):
        statusline.format(served_total=1)


def test_the_older_prose_line_still_reads() -> None:
    """A worker not yet reloaded onto this version still sends the prose line."""
    old = "draining, requests served 5, in flight 1, errors 2, connections 3, websockets 4, access log lines dropped 6"
    assert statusline.parse(old) == {"served": 5, "in_flight": 1, "errors": 2, "connections": 3, "websockets": 4,
                                     "log_dropped": 6}


class _WsgiServer:
    """Stands for the WSGI engine's server: counters only, no websockets."""


@pytest.mark.parametrize("server_type", [_WsgiServer, asgi.AsgiServer])
def test_status_reads_what_the_runtime_writes(monkeypatch: pytest.MonkeyPatch, server_type: Any) -> None:
    """Runtime._status itself (not a copy of its format) produces the line that ops parses."""
    sent: list[str] = []
    monkeypatch.setattr(notify, "notify", lambda **kw: sent.append(kw["status"]))
    server = object.__new__(server_type)
    for key, value in {"served": 9, "in_flight": 1, "errors": 2, "connections": {1: 0, 2: 0}, "websockets": 4}.items():
        setattr(server, key, value)
    runtime = SimpleNamespace(server=server, draining=True, access=SimpleNamespace(dropped=3), last_status="", engine="python",
                              loop=SimpleNamespace(call_later=lambda *a: None), _status=None)
    Runtime._status(runtime)  # type: ignore[arg-type]
    (text,) = sent
    expected = {"served": 9, "in_flight": 1, "errors": 2, "connections": 2, "log_dropped": 3, "engine": "python"}
    if server_type is asgi.AsgiServer:
        expected["websockets"] = 4
    assert statusline.parse(text) == expected and text.startswith("state=draining ")


def test_engine_is_read_back_as_a_word() -> None:
    """--engine: the worker says which HTTP engine serves; `status --json` reports it (a word, not a count)."""
    text = statusline.format(served=3, engine="compiled")
    assert text == "served=3 engine=compiled"
    assert statusline.parse(text) == {"served": 3, "engine": "compiled"}
    assert "engine" not in statusline.parse("served=3 engine=")
