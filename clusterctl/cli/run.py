"""`clusterctl run`: the worker in the foreground, same options as `python -m clusterctl.worker`.

The option table lives in clusterctl.worker (OPTIONS) so the unit's ExecStart= and this command can
never drift apart; this module only turns it into click options.
"""

from __future__ import annotations

from typing import Any

import click

from clusterctl.cli import cli
from clusterctl.worker.options import OPTIONS, WorkerConfig, size_bytes


def _options(func: Any) -> Any:
    defaults = WorkerConfig(app="")
    for flag, dest, typ, text in reversed(OPTIONS):
        default = getattr(defaults, dest)
        text = text.replace("%%", "%")
        if typ is bool:
            opt = click.option(f"{flag}/--no-{flag[2:]}", dest, default=default, show_default=True, help=text)
        elif typ is list:
            opt = click.option(flag, dest, multiple=True, metavar="ADDR", help=text)
        elif dest == "app":
            opt = click.option(flag, dest, required=True, metavar="MODULE:CALLABLE", help=text)
        else:
            opt = click.option(flag, dest, type=typ, default=default, show_default=True, help=text,
                               metavar="SIZE" if typ is size_bytes else None)
        func = opt(func)
    return func


@cli.command()
@_options
def run(**kwargs: Any) -> None:
    """Serve a WSGI app in the foreground (what each systemd instance runs).

    Under systemd it takes the socket the unit passes; for local development use --bind, e.g.
    `clusterctl run --app examples.hello:app --bind 127.0.0.1:8000`.
    """
    from clusterctl.worker import runtime

    kwargs["bind"] = list(kwargs["bind"])
    code = runtime.run(WorkerConfig(**kwargs))
    raise SystemExit(code)
