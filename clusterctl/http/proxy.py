"""Behind a proxy: whom to believe about the client, and the PROXY protocol header (HAProxy, cloud balancers).

Two opt-in worker settings, both off by default, because a forwarded header from a peer nobody vouched for is
a client lying about its address:

* `--forwarded-allow-ips` (gunicorn's name; uvicorn's `--proxy-headers`): from a peer in that list the
  request's `Forwarded` (RFC 7239) or `X-Forwarded-For` / `X-Forwarded-Proto` headers set REMOTE_ADDR / the
  ASGI `client` and the scheme. The client is the right-most address that is not itself a trusted proxy, so a
  client cannot put an address of its choosing in front of the chain. Untrusted peers' headers are ignored.
* `--proxy-protocol`: every connection starts with a PROXY protocol v1 or v2 header (the balancer's
  `send-proxy`), whose source address becomes the client's. A connection without a valid one is closed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from clusterctl.http.protocol import HttpProtocol, log
from clusterctl.http.request import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Trusted:
    """The peers whose forwarded headers are believed: addresses or networks, `*` for any, `unix` for peers on
    a unix socket (a proxy on the same host)."""

    networks: tuple[Network, ...] = ()
    anyone: bool = False
    unix: bool = False

    def trusts(self, ip: str | None) -> bool:
        if ip is None or ip == "":
            return self.anyone or self.unix
        if self.anyone:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


def parse_trusted(spec: str) -> Trusted | None:
    """`127.0.0.1,10.0.0.0/8,::1`, `*` or `unix`, comma-separated; "" is off (None). ValueError names a bad item."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items:
        return None
    nets: list[Network] = []
    anyone = unix = False
    for item in items:
        if item == "*":
            anyone = True
        elif item == "unix":
            unix = True
        else:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"not an IP address or network: {item!r}") from None
    return Trusted(tuple(nets), anyone, unix)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def _strip_port(node: str) -> str:
    node = node.strip().strip('"')
    if node.startswith("["):
        return node[1:node.find("]")] if "]" in node else ""
    if node.count(":") == 1:  # IPv4:port (a bare IPv6 address has more colons)
        return node.split(":", 1)[0]
    return node


def forwarded_client(headers: Iterable[tuple[bytes, bytes]], trusted: Trusted) -> tuple[str | None, str | None]:
    """(client address, scheme) as the trusted proxy chain tells them, each None when it does not say."""
    headers = list(headers)
    hops: list[tuple[str, str | None]] = []  # (address, proto of that hop), left to right
    for value in _header(headers, b"forwarded"):
        for element in value.decode("latin-1").split(","):
            pairs = dict(p.strip().split("=", 1) for p in element.split(";") if "=" in p)
            pairs = {k.strip().lower(): v.strip().strip('"') for k, v in pairs.items()}
            if "for" in pairs:
                hops.append((_strip_port(pairs["for"]), pairs.get("proto")))
    if not hops:
        for value in _header(headers, b"x-forwarded-for"):
            hops += [(_strip_port(x), None) for x in value.decode("latin-1").split(",") if x.strip()]
        protos = [p.strip() for v in _header(headers, b"x-forwarded-proto") for p in v.decode("latin-1").split(",")]
        if protos and hops:
            hops[-1] = (hops[-1][0], protos[-1])
        elif protos:
            return None, _scheme(protos[-1])
    client = scheme = None
    for address, proto in reversed(hops):  # from the nearest hop out, through proxies we trust
        client = address
        if proto and scheme is None:
            scheme = _scheme(proto)
        if not trusted.trusts(address):
            break
    return client or None, scheme


def _scheme(value: str | None) -> str | None:
    v = (value or "").strip().lower()
    return v if v in ("http", "https") else None


# -- PROXY protocol ---------------------------------------------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1 = 107  # the longest v1 line, CRLF included (the spec's figure)


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header: the connection is closed."""


def parse_proxy_header(data: bytes) -> tuple[int, tuple[str, int] | None] | None:
    """(bytes the header takes, the source (address, port) or None for LOCAL/UNKNOWN), or None while incomplete."""
    if data[:12] == V2_SIGNATURE[:len(data[:12])] and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError("PROXY v2: bad version")
        end = 16 + length
        if len(data) < end:
            return None
        if ver_cmd & 0x0F == 0:  # LOCAL: the balancer's own health check
            return end, None
        if ver_cmd & 0x0F != 1:
            raise ProxyHeaderError("PROXY v2: bad command")
        body = data[16:end]
        if fam >> 4 == 1 and len(body) >= 12:
            return end, (socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack("!H", body[8:10])[0])
        if fam >> 4 == 2 and len(body) >= 36:
            return end, (socket.inet_ntop(socket.AF_INET6, body[0:16]), struct.unpack("!H", body[32:34])[0])
        return end, None  # AF_UNIX or unspecified: no address to use
    if data[:6] != b"PROXY "[:len(data[:6])]:
        raise ProxyHeaderError("no PROXY protocol header")
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= MAX_V1:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("bad PROXY v1 line")
    try:
        address = str(ipaddress.ip_address(parts[2]))
        ipaddress.ip_address(parts[3])
        port, dport = int(parts[4]), int(parts[5])
    except ValueError:
        raise ProxyHeaderError("bad PROXY v1 address") from None
    if not (0 <= port <= 65535 and 0 <= dport <= 65535):
        raise ProxyHeaderError("bad PROXY v1 port")
    return end + 2, (address, port)


class PeerTransport:
    """The transport as the adapters see it once a PROXY header named the real client: same object otherwise."""

    __slots__ = ("_peer", "_transport")

    def __init__(self, transport: Any, peer: tuple[str, int]) -> None:
        self._transport = transport
        self._peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        return self._transport.get_extra_info(name, default)


# -- the connection side -----------------------------------------------------------------------------------

class _Proxied(HttpProtocol):
    """Mixed in front of an adapter behind a proxy (Server.behind_proxy): the PROXY header names the client
    before anything is parsed; a trusted peer's forwarded headers name it per request (adapters' use_view)."""

    __slots__ = ()

    def setup(self, transport: Any) -> None:
        if self.server.proxy_protocol:
            self.pp_buf = b""  # type: ignore[attr-defined]  # setup waits for the PROXY header (data_received)
            return
        self.pp_buf = None  # type: ignore[attr-defined]
        self._setup_peer(transport)

    def _setup_peer(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else None  # type: ignore[attr-defined]
        super().setup(transport)
        self.conn_view = self.saved_view()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.pp_buf  # type: ignore[attr-defined]
        if buf is not None:
            buf += data
            try:
                got = parse_proxy_header(buf)
            except ProxyHeaderError as e:
                log.debug("closing a connection: %s", e)
                self.abort()
                return
            if got is None:
                self.pp_buf = buf  # type: ignore[attr-defined]  # bounded: v1 107 bytes, v2 16 + 65535
                return
            end, source = got
            self.pp_buf = None  # type: ignore[attr-defined]
            self._setup_peer(PeerTransport(self.transport, source) if source else self.transport)
            data = buf[end:]
            if not data:
                return
        super().data_received(data)

    def handle(self, req: Request, keep_alive: bool) -> None:
        trusted = self.server.trusted
        if trusted is not None and trusted.trusts(self.peer_ip):  # type: ignore[attr-defined]
            self.use_view(self.conn_view, *forwarded_client(req.headers, trusted))  # type: ignore[attr-defined]
        super().handle(req, keep_alive)


_PROXIED: dict[type, type] = {}


def proxied(cls: type[HttpProtocol]) -> type[HttpProtocol]:
    """`cls` with _Proxied in front (made once per adapter class)."""
    sub = _PROXIED.get(cls)
    if sub is None:
        sub = _PROXIED[cls] = type(f"Proxied{cls.__name__}", (_Proxied, cls),
                                   {"__slots__": ("conn_view", "peer_ip", "pp_buf")})
    return sub
