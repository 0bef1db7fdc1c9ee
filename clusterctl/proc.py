"""Every subprocess goes through `run()`, the way mkosi's run.py does it.

Commands are argument lists, never strings for a shell, so user input can never become shell syntax.
A failure raises `CommandError` quoting the exact command, its exit code and the tail of its stderr.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from clusterctl.errors import ClusterctlError, CommandError

log = logging.getLogger(__name__)


def which(program: str, *, fix: str) -> str:
    """Absolute path of `program`, or a ClusterctlError saying how to get it."""
    path = shutil.which(program)
    if path is None:
        raise ClusterctlError(f"'{program}' was not found on PATH", fix)
    return path


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = True,
    input: str | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` (a list, never a shell string) and return its result as text."""
    if isinstance(argv, str):
        raise TypeError("run() takes an argument list, not a shell string")
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        result = subprocess.run(
            args,
            check=False,
            text=True,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError as e:
        raise CommandError(f"cannot run {shlex.join(args)}: {args[0]} not found",
                           f"install {args[0]} or put it on PATH") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(f"{shlex.join(args)} did not finish within {timeout}s") from e
    if check and result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip().splitlines()[-3:]
        detail = ("; ".join(tail)) if tail else "no output"
        raise CommandError(f"{shlex.join(args)} exited {result.returncode}: {detail}")
    return result


def stream(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the stdout lines of a long-running command (journalctl -f) until it ends or the caller
    stops iterating, then end the command."""
    if isinstance(argv, str):
        raise TypeError("stream() takes an argument list, not a shell string")
    args = [str(a) for a in argv]
    log.debug("stream: %s", shlex.join(args))
    try:
        child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=dict(env) if env is not None else None)
    except FileNotFoundError as e:
        raise CommandError(f"cannot run {shlex.join(args)}: {args[0]} not found",
                           f"install {args[0]} or put it on PATH") from e
    assert child.stdout is not None
    try:
        yield from child.stdout
    finally:
        if child.poll() is None:
            child.terminate()
        child.wait()


def launch(argv: Sequence[str], *, env: Mapping[str, str], pass_fds: Sequence[int] = (), timeout: float = 30.0) -> int:
    """Run a launcher that forks its real work off and exits at once (the in-place reload's new worker,
    see clusterctl.worker.handover); returns its exit code. stdout/stderr are inherited: under systemd, the journal."""
    if isinstance(argv, str):
        raise TypeError("launch() takes an argument list, not a shell string")
    args = [str(a) for a in argv]
    log.debug("launch: %s", shlex.join(args))
    try:
        child = subprocess.Popen(args, env=dict(env), pass_fds=tuple(pass_fds), stdin=subprocess.DEVNULL)
    except OSError as e:
        raise CommandError(f"cannot run {shlex.join(args)}: {e.strerror or e}",
                           "check ExecStart='s interpreter path (clusterctl generate --python)") from e
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        child.kill()
        child.wait()
        raise CommandError(f"{shlex.join(args)} did not fork within {timeout:g}s") from e


def spawn(argv: Sequence[str], *, stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None,
          env: Mapping[str, str] | None = None, cwd: str | None = None, new_session: bool = False,
          before_exec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start a child that outlives this call (the sandbox's supervisor and forwarders, its unshare) and
    return it; the caller owns it. Other fds are closed in the child."""
    if isinstance(argv, str):
        raise TypeError("spawn() takes an argument list, not a shell string")
    args = [str(a) for a in argv]
    log.debug("spawn: %s", shlex.join(args))
    try:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, close_fds=True, cwd=cwd,
                                env=dict(env) if env is not None else None, start_new_session=new_session,
                                preexec_fn=before_exec)
    except OSError as e:
        raise CommandError(f"cannot run {shlex.join(args)}: {e.strerror or e}", f"install {args[0]} or put it on PATH") from e
