"""The `clusterctl` command line: a thin click layer over the modules that do the work.

Each command group lives in its own module here and only parses options, calls one function of the
module that owns the job, and prints. `ClusterctlError` from anywhere becomes one `Error: ...` line and
a non-zero exit.
"""

from __future__ import annotations

import logging

import click

from clusterctl import __version__
from clusterctl.errors import ClusterctlError


class _UserError(click.ClickException):
    def __init__(self, err: ClusterctlError) -> None:
        super().__init__(str(err))
        self.exit_code = err.exit_code


class _Group(click.Group):
    """Turns ClusterctlError raised by any subcommand into a clean one-line error."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ClusterctlError as e:
            raise _UserError(e) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clusterctl")
@click.option("--debug", is_flag=True, help="Log every external command run.")
def cli(debug: bool) -> None:
    """Run Python web apps as a cluster of systemd-managed workers."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


def _register() -> None:
    # Imported here so each command module can import `cli` without a cycle.
    from clusterctl.cli import deploy as _deploy  # noqa: F401
    from clusterctl.cli import generate as _generate  # noqa: F401
    from clusterctl.cli import messaging as _messaging  # noqa: F401
    from clusterctl.cli import ops as _ops  # noqa: F401
    from clusterctl.cli import run as _run  # noqa: F401
    from clusterctl.cli import sandbox as _sandbox  # noqa: F401


_register()


def main() -> None:
    cli(prog_name="clusterctl")
