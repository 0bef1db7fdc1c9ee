"""Sockets handed over by systemd, sockets bound for local development, and sd_notify.

systemd owns the listening socket: it keeps it open while a worker restarts, so connections wait in the
kernel's queue instead of being refused. We take it with `sd_listen_fds()` (honours LISTEN_PID, so a
stray inherited environment is ignored), unset LISTEN_* so the app's children do not think the fds are
theirs, keep the fds close-on-exec, and never call listen() again (that would change the unit's Backlog=
and trips SELinux, gunicorn#3747). `notify()` is a no-op without NOTIFY_SOCKET, so the same code runs
under systemd, under `systemd-socket-activate` and from a terminal.
"""

from __future__ import annotations

import os
import socket
import stat

from clusterctl import address
from clusterctl.errors import ClusterctlError

NO_SOCKETS_FIX = (
    "run it from the generated systemd units (clusterctl generate), or hand it a socket the systemd way: "
    "`systemd-socket-activate -l 127.0.0.1:8000 python -m clusterctl.worker --app MODULE:APP`, "
    "or bind one yourself for local development with --bind 127.0.0.1:8000"
)


def listen_fds() -> list[socket.socket]:
    """The listening sockets systemd passed us (LISTEN_FDS), as socket objects; [] if none.

    `socket.socket(fileno=fd)` asks the kernel for family and type, so AF_INET, AF_INET6 and AF_UNIX
    fds all work (uvicorn#295 assumed AF_UNIX). The fds stay blocking-agnostic: the event loop sets
    O_NONBLOCK, which is shared with systemd and the siblings, and tolerates EAGAIN on accept.
    """
    from systemd import daemon

    fds = daemon.listen_fds(unset_environment=True)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    socks: list[socket.socket] = []
    for fd in fds:
        os.set_inheritable(fd, False)
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ClusterctlError(f"fd {fd} passed by systemd is not a socket",
                                  "check the ListenStream=/ListenFIFO= lines of the socket unit")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise ClusterctlError(f"fd {fd} passed by systemd is not a stream socket ({sock.type!r})",
                                  "use ListenStream= in the socket unit")
        socks.append(sock)
    return socks


def parse_bind(addr: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """'host:port', '[v6]:port', ':port', 'port' or 'unix:/path' (clusterctl.address, --bind's rules) ->
    (family, address) for socket()."""
    a = address.parse(addr, "--bind", bind=True)
    if a.kind == "unix":
        return socket.AF_UNIX, str(a.path)
    host = a.host or "0.0.0.0"
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(a.port or 0))


def bind(addr: str, backlog: int = 1024) -> socket.socket:
    """A listening socket for local development (`--bind`), made the way a socket unit would."""
    family, address = parse_bind(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            assert isinstance(address, str)
            if os.path.exists(address) and stat.S_ISSOCK(os.stat(address).st_mode):
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(address)
                except OSError:
                    os.unlink(address)  # stale socket file from a dead run: ours to replace
                else:
                    raise ClusterctlError(f"{address} is in use by another server",
                                          "stop it or choose another path")
                finally:
                    probe.close()
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ClusterctlError(f"cannot listen on {addr}: {e.strerror or e}",
                              "choose a free port/path, or stop what is using it (ss -ltnp)") from e
    except BaseException:
        sock.close()
        raise
    return sock


def describe(sock: socket.socket) -> str:
    """Human-readable listening address, for logs and STATUS."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name if isinstance(name, str) else name.decode(errors='replace')}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def enabled() -> bool:
    """True when a service manager listens for our notifications."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*, ready: bool = False, status: str | None = None, watchdog: bool = False,
           stopping: bool = False) -> bool:
    """Send READY=1 / STATUS= / WATCHDOG=1 / STOPPING=1 in one datagram; no-op without NOTIFY_SOCKET."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    lines = []
    if ready:
        lines.append(f"READY=1\nMAINPID={os.getpid()}")
    if stopping:
        lines.append("STOPPING=1")
    if watchdog:
        lines.append("WATCHDOG=1")
    if status is not None:
        lines.append("STATUS=" + status.replace("\n", " "))
    if not lines:
        return False
    from systemd import daemon

    return bool(daemon.notify("\n".join(lines)))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is armed."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def under_systemd() -> bool:
    """True when journald is our stdout/stderr (a unit), so structured journal fields are worth sending."""
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
