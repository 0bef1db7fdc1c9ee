"""Primary-to-worker messages, the systemd way: a Unix datagram socket per worker in the unit's
RuntimeDirectory, and the last broadcast state in a file beside them.

Layout of the runtime directory (RuntimeDirectory=NAME, shared by every instance and the task unit,
preserved across restarts, mode 0700 and owned by the service user):

    /run/NAME/worker-I.sock   bound by instance I on start (a stale one is replaced)
    /run/NAME/state.json      the merge of every broadcast so far, replaced atomically (tmp + rename)

A broadcast merges its top-level keys into state.json first, then sends one datagram to every socket;
a worker binds its socket first, then loads state.json. Whatever the interleaving, a worker either finds
the new value in the file or gets the datagram, so one that starts or restarts later is never stale.

Here: the wire format (datagrams, state.json, socket names and placement) and the sending side; the
receiving side is clusterctl.worker.inbox. This module must stay cheap to import (stdlib only, no click, no
ops, and neither pathlib nor json at import time: every worker imports it, and json is only needed once a
message or a saved state arrives). The sending side takes a directory path, so the CLI can pass a
`Systemd.path()` (a sandbox's /run through /proc/PID/root) and the task unit its own RUNTIME_DIRECTORY.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("clusterctl.messaging")

#: Largest message, as compact JSON. Datagrams are atomic: a message arrives whole or not at all.
MAX_MESSAGE = 64 * 1024
#: Envelope around a message: {"kind": "broadcast"|"send", "data": MESSAGE}.
ENVELOPE = 64
STATE_FILE = "state.json"
SOCKET_RE = re.compile(r"^worker-([A-Za-z0-9_.-]+)\.sock$")
INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SEND_TIMEOUT = 1.0  # a worker whose queue stays full this long is reported, not waited for


class MessageError(ValueError):
    """A message that cannot be sent: not JSON, not an object, or too large. Nothing was sent."""


def socket_name(instance: str) -> str:
    return f"worker-{instance}.sock"


def bind_placed(sock: socket.socket, path: str, staged: bool) -> tuple[str, int]:
    """Bind a worker's socket (messaging, in-place reload control) at `path`, or, for a process an in-place
    reload started, at a hidden name beside it that no sender looks at until it is renamed into place. A
    socket left there by this instance's previous process is removed first (RuntimeDirectoryPreserve=yes).
    Returns (the bound path, its inode): `unlink_placed` removes only what is still ours."""
    bound = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}") if staged else path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(bound)
    sock.bind(bound)
    os.chmod(bound, 0o600)
    return bound, os.stat(bound).st_ino


def unlink_placed(bound: str, ino: int) -> None:
    """Remove a socket `bind_placed` made unless another process's socket took its path meanwhile. A process
    an in-place reload replaced must not call it at all: its successor renames over the path, and a
    stat-then-unlink could remove the successor's socket."""
    with contextlib.suppress(OSError):
        if os.stat(bound).st_ino == ino:
            os.unlink(bound)


# --- encoding ---------------------------------------------------------------------------------------

def encode(message: Any) -> bytes:
    """A message (a dict) as compact JSON bytes, checked: a JSON object of at most MAX_MESSAGE bytes."""
    if not isinstance(message, dict):
        raise MessageError(f"a message must be a JSON object ({{...}}), not a {type(message).__name__}"
                           " (e.g. {\"usersCount\": 42})")
    import json

    try:
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise MessageError(f"the message is not JSON-serialisable: {e}") from None
    if len(data) > MAX_MESSAGE:
        raise MessageError(f"the message is {len(data)} bytes of JSON, more than the limit of {MAX_MESSAGE}"
                           " (send a key or an id, and keep the bulk in a file or database)")
    return data


def parse(text: str | bytes) -> dict[str, Any]:
    """JSON text from a user (the CLI's argument) -> the message dict, or MessageError saying why."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 4 * MAX_MESSAGE:  # do not even parse something this large
        raise MessageError(f"the message is {len(raw)} bytes, more than the limit of {MAX_MESSAGE}")
    import json

    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MessageError(f"the message is not valid JSON: {e}") from None
    encode(value)  # type and size checks
    return value


def _envelope(kind: str, data: bytes) -> bytes:
    return b'{"kind":"' + kind.encode() + b'","data":' + data + b"}"


def decode(datagram: bytes) -> tuple[str, dict[str, Any]]:
    """A received datagram -> (kind, message); ValueError for anything malformed."""
    if len(datagram) > MAX_MESSAGE + ENVELOPE:
        raise ValueError(f"datagram of {len(datagram)}+ bytes is over the limit")
    import json

    env = json.loads(datagram)
    if not isinstance(env, dict) or env.get("kind") not in ("broadcast", "send") or not isinstance(env.get("data"), dict):
        raise ValueError("not a clusterctl message (want {\"kind\": \"broadcast\"|\"send\", \"data\": {...}})")
    return env["kind"], env["data"]


# --- state file -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _dir_fd(directory: str | Path) -> Iterator[int]:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"runtime directory {directory} does not exist") from None
    try:
        yield fd
    finally:
        os.close(fd)


def load_state(directory: str | Path) -> dict[str, Any]:
    """The saved state, or {} when there is none yet; a broken file is logged and ignored."""
    path = os.path.join(directory, STATE_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
        import json

        value = json.loads(data)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    return value if isinstance(value, dict) else {}


def save_state(dfd: int, update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into state.json under the directory's lock; returns the new state.

    Written to a temporary file, then renamed over the old one: readers see the old or the new file,
    never half of one. The lock (flock on the directory) keeps two broadcasters from losing an update.
    When root writes it (the CLI), the file is given to the directory's owner, the service user."""
    import json

    fcntl.flock(dfd, fcntl.LOCK_EX)
    try:
        try:
            with open(STATE_FILE, "rb", opener=lambda p, fl: os.open(p, fl, dir_fd=dfd)) as f:
                old = json.loads(f.read())
        except (OSError, ValueError):
            old = {}
        state = {**(old if isinstance(old, dict) else {}), **update}
        tmp = f".{STATE_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            try:
                _write_all(fd, json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode())
                os.fchmod(fd, 0o600)
                st = os.fstat(dfd)
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):  # chown is filtered out in the units
                    os.fchown(fd, st.st_uid, st.st_gid)
            finally:
                os.close(fd)
            os.rename(tmp, STATE_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:
            # A full file system (ENOSPC) fails the write: the old state.json stays whole, and no temporary
            # file is left to take up what little space there is.
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        return state
    finally:
        fcntl.flock(dfd, fcntl.LOCK_UN)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written: a nearly full file system can take part of it and then
    fail (ENOSPC), which must never be renamed over state.json as a truncated file."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


# --- sending ----------------------------------------------------------------------------------------

@dataclass
class Delivery:
    """Who got a message: instances that received it, and why the others did not."""

    kind: str
    size: int
    received: list[str] = field(default_factory=list)
    missed: dict[str, str] = field(default_factory=dict)
    not_saved: str = ""  # a broadcast whose state.json write failed: why (running workers still got it)

    def summary(self, name: str) -> str:
        total = len(self.received) + len(self.missed)
        text = f"{name}: {self.kind} of {self.size} bytes received by {len(self.received)}/{total} instance(s)"
        if self.received:
            text += f": {', '.join(self.received)}"
        if self.missed:
            text += "; not received by " + ", ".join(f"{i} ({why})" for i, why in self.missed.items())
        if self.not_saved:
            text += (f"; NOT saved as state ({self.not_saved}): workers that start later will not have it"
                     " until the next broadcast")
        return text


def _order(instance: str) -> tuple[int, str]:
    return (int(instance), "") if instance.isdigit() else (1 << 30, instance)


def _send_one(sock: socket.socket, dfd: int, instance: str, datagram: bytes) -> str | None:
    """Send to one worker's socket; None when it got it, else why not."""
    # Through the directory's fd: a short path whatever the directory's (a sandbox's /proc/PID/root/run/...
    # can pass the 108-byte limit of sun_path).
    try:
        sock.sendto(datagram, f"/proc/self/fd/{dfd}/{socket_name(instance)}")
    except (FileNotFoundError, ConnectionRefusedError):
        return "not running"
    except PermissionError:
        return "permission denied (run as root or as the service user)"
    except (TimeoutError, BlockingIOError):
        return f"its queue stayed full for {SEND_TIMEOUT:g}s (event loop blocked?)"
    except OSError as e:
        return e.strerror or str(e)
    return None


def deliver(directory: str | Path, message: dict[str, Any], *, instance: str | None = None,
            expected: Sequence[str] = ()) -> Delivery:
    """Broadcast `message` to every worker with a socket in `directory` (and save it as state), or send it
    to one `instance` only (not saved). `expected` instances without a socket are reported as not running.

    Raises MessageError (bad message) or FileNotFoundError (no runtime directory) before sending anything.
    """
    data = encode(message)
    kind = "send" if instance is not None else "broadcast"
    if instance is not None and not INSTANCE_RE.match(instance):
        raise MessageError(f"{instance!r} is not an instance name (e.g. 2)")
    with _dir_fd(directory) as dfd:
        result_not_saved = ""
        if instance is not None:
            targets = [instance]
        else:
            try:
                save_state(dfd, message)
            except OSError as e:
                # e.g. /run full: the workers that run still get the message; only the saved copy is missing
                result_not_saved = f"cannot write {os.path.join(directory, STATE_FILE)}: {e.strerror or e}"
                log.warning("broadcast not saved as state: %s", result_not_saved)
            found = {m.group(1) for n in os.listdir(dfd) if (m := SOCKET_RE.match(n))}
            targets = sorted(found | set(expected), key=_order)
        result = Delivery(kind, len(data), not_saved=result_not_saved)
        datagram = _envelope(kind, data)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT)
            for i in targets:
                why = _send_one(sock, dfd, i, datagram)
                if why is None:
                    result.received.append(i)
                else:
                    result.missed[i] = why
    return result


def runtime_dir(name: str, *, user: bool = False) -> str:
    """RuntimeDirectory=NAME as a path: /run/NAME, or $XDG_RUNTIME_DIR/NAME for a user manager."""
    if user:
        base = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return f"{base}/{name}"
    return f"/run/{name}"


def remove_runtime_dir(path: Path) -> None:
    """Remove a cluster's runtime directory (uninstall). With DynamicUser= systemd makes /run/NAME a symlink
    to /run/private/NAME: both go. (`systemctl clean --what=runtime` would need D-Bus.)"""
    import shutil
    from pathlib import Path

    if path.is_symlink():
        # Never resolve() here: under a sandbox's /proc/PID/root that would land on the host's /run.
        link = os.readlink(path)
        path.unlink()
        if not os.path.isabs(link) and ".." not in Path(link).parts:
            shutil.rmtree(path.parent / link, ignore_errors=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
