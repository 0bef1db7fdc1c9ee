"""Event-loop helpers shared by the adapters: hiding the running loop from WSGI app code, waking futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_set_running_loop = asyncio._set_running_loop  # type: ignore[attr-defined]


class _Visible(Coroutine[Any, Any, Any]):
    """A coroutine that sees its running loop only while it runs a step (see `hide_running_loop`)."""

    __slots__ = ("coro", "loop")

    def __init__(self, coro: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.coro = coro
        self.loop = loop

    def send(self, value: Any) -> Any:
        _set_running_loop(self.loop)
        try:
            return self.coro.send(value)
        finally:
            _set_running_loop(None)

    def throw(self, *args: Any) -> Any:
        _set_running_loop(self.loop)
        try:
            return self.coro.throw(*args)
        finally:
            _set_running_loop(None)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def __getattr__(self, name: str) -> Any:  # cr_frame, __qualname__ ...: what asyncio's repr and debug read
        return getattr(self.coro, name)


def _visible_task(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
    return asyncio.Task(_Visible(coro, loop), loop=loop, **kw)


def hide_running_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run WSGI app code as under a sync server: no running event loop visible to it, so Django's
    async-unsafe checks, asgiref's async_to_sync, Flask's async views and asyncio.run() in a view work.

    The loop is hidden from every callback (protocol callbacks, where the app runs, timers) and shown only
    to coroutines, each step of which a task factory wraps. In a WSGI worker coroutines are the runtime's own
    (start-up, readiness probe, hand-over), so the price is paid a few times per process instead of twice per
    request: on CPython 3.11 each `_set_running_loop` allocates and calls getpid(), a system call (~0.25 us on
    these VMs; bench/RESULTS.md). Call before run_until_complete: the first task step hides it."""
    loop.set_task_factory(_visible_task)


def settle(fut: asyncio.Future[None] | None) -> None:
    """Wake a coroutine parked on `fut` (the caller has already forgotten it); a cancelled one stays as it is."""
    if fut is not None and not fut.done():
        fut.set_result(None)
