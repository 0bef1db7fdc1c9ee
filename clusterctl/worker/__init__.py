"""The worker-side API for apps, and the package that holds what runs inside each unit.

Apps may import `instance` (the systemd instance name, `%i`) and `name` to tell workers apart, read
`state` (the merged broadcasts, see clusterctl.messaging) and register `on_message` handlers; all of it
works when the app imports this module before the runtime starts, and it stays cheap to import (os only).

The package: `__main__` (`python -m clusterctl.worker`, the ExecStart= of every instance) parses
`options` and starts `runtime`, which serves through clusterctl.http and talks to systemd through
`notify`; `watchdog` (--timeout and WATCHDOG=1), `accesslog`, `handover` (in-place reload) and the
messaging inbox run beside it. `reload` (ExecReload=) and `task` (a timer's oneshot) are the other
processes a unit starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

#: The systemd instance of this worker (`%i`, e.g. "1"), or "" outside a template unit.
instance: str = os.environ.get("CLUSTERCTL_INSTANCE", "")
#: The cluster's name (`--name`), or "".
name: str = os.environ.get("CLUSTERCTL_NAME", "")


class State(Mapping[str, Any]):
    """The last broadcast value of every key (`clusterctl broadcast NAME '{"usersCount": 42}'` sets
    `state["usersCount"]`), read-only. The event loop swaps in a whole new mapping per broadcast, so a
    request thread reads without locks and never sees half an update; `snapshot()` pins one version for
    reading several keys consistently. Loaded from the runtime directory before READY=1."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: Mapping[str, Any] = MappingProxyType({})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"State({dict(self._data)!r})"

    def snapshot(self) -> Mapping[str, Any]:
        """The current version, immutable: later broadcasts do not change it."""
        return self._data


#: The merged broadcasts (a read-only mapping; `from clusterctl.worker import state` works too).
state: State = State()
_handlers: list[Callable[[dict[str, Any]], Any]] = []


def on_message(handler: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """Call `handler(message)` for every message this worker gets (broadcast or sent to it), and once on
    start with the saved state when there is one. It runs on the event loop: it must not block (hand slow
    work to a thread). An `async def` handler (natural in ASGI apps) runs as a task on the loop, so it may
    await. An exception is logged and never stops the worker. Usable as a decorator."""
    if not callable(handler):
        raise TypeError("on_message needs a callable")
    _handlers.append(handler)
    return handler


def _set_state(value: dict[str, Any]) -> None:
    """The runtime's side: replace the state in one reference assignment (atomic for readers)."""
    state._data = MappingProxyType(dict(value))
