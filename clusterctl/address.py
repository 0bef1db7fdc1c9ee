"""Listen addresses, parsed and spelt in one place (stdlib only, so the worker side can use it too).

One `Address` is what a socket unit listens on: `--listen` gives it (`parse`), ListenStream= and the
header spell it back (`unit_value`, `spec`), and clients reach it (`url`, `reach`: a wildcard bind is
reached on loopback).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from clusterctl.errors import ClusterctlError

FIX = "use PORT, 127.0.0.1:8000, [::1]:8000 or unix:/run/NAME.sock"


@dataclass(frozen=True)
class Address:
    """One TCP (host None: every address) or unix stream socket address."""

    kind: Literal["tcp", "unix"]
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def unit_value(self) -> str:
        """The value for ListenStream=."""
        if self.kind == "unix":
            return str(self.path)
        if self.host is None:
            return str(self.port)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def spec(self) -> str:
        """The address as --listen takes it."""
        return self.unit_value if self.kind == "tcp" else f"unix:{self.path}"

    @property
    def reach(self) -> tuple[str, int]:
        """(host, port) a client connects to: a wildcard bind (none, 0.0.0.0, ::) is reached on loopback."""
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return host, int(self.port or 0)

    @property
    def url(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host, port = self.reach
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def parse(value: str, option: str = "--listen", *, bind: bool = False) -> Address:
    """`PORT`, `IPv4:PORT`, `[IPv6]:PORT`, or `unix:/abs/path` (or just `/abs/path`, as ListenStream= has it);
    a ClusterctlError naming `option`, the value and the fix otherwise.

    `bind`: the worker's own --bind (local development without systemd): a bare PORT is loopback rather than
    every address, `:PORT` is every address, a host name is taken as given, and port 0 picks a free one."""
    if value.startswith(("unix:", "/")):
        path = value.removeprefix("unix:")
        if not path.startswith("/") or "\n" in path or len(path.encode()) > 107:
            raise ClusterctlError(f"{option} {value!r}: a unix socket needs an absolute path under 108 bytes", FIX)
        return Address("unix", path=path)
    host: str | None
    if value.isdigit():
        host, port_s = ("127.0.0.1" if bind else None), value
    elif value.startswith("["):
        host, sep, port_s = value[1:].partition("]:")
        if not sep:
            raise ClusterctlError(f"{option} {value!r}: an IPv6 address needs the form [ADDR]:PORT", FIX)
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ClusterctlError(f"{option} {value!r} has no port", FIX)
        if bind and not host:
            host = None
    named = bind and host is not None and not value.startswith("[") and ":" not in host  # --bind: the socket resolves
    if host is not None and not named:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ClusterctlError(
                f"{option} {value!r}: {host!r} is not an IP address (systemd sockets bind addresses, not names)",
                FIX,
            ) from None
        if value.startswith("[") != (addr.version == 6):
            raise ClusterctlError(f"{option} {value!r}: write IPv6 addresses in brackets, IPv4 without", FIX)
        host = str(addr)
    if not port_s.isdigit() or not (0 if bind else 1) <= int(port_s) <= 65535:
        raise ClusterctlError(f"{option} {value!r}: port must be a number from {0 if bind else 1} to 65535", FIX)
    return Address("tcp", host=host, port=int(port_s))
