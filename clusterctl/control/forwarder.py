"""Forward a host port into a sandbox: a small detached host process per port that listens on the host
and connects each client to the sandbox's loopback from inside its network namespace.

A job of its own beside the sandbox (which boots and stops systemd): `up` forwards a sandboxed cluster's
ports, `down` and `sandbox down` stop the forwarders. `python -m clusterctl.control.forwarder __forward NAME
HOSTPORT SANDBOXPORT HOST` is the detached process (the `__forward` marker identifies it before a kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

from clusterctl.control import sandbox as sb
from clusterctl.errors import ClusterctlError


def pidfile(name: str, host_port: int) -> Path:
    """Where the forwarder of `host_port` into sandbox `name` keeps its pid."""
    return sb.state_dir(name) / f"forward-{int(host_port)}.pid"


def forward(name: str, host_port: int, sandbox_port: int, *, host: str = "127.0.0.1",
            timeout: float = 5.0) -> int:
    """Expose the sandbox's 127.0.0.1:SANDBOX_PORT on the host's HOST:HOST_PORT; returns the forwarder's
    pid. It runs until `unforward()`, `down()` or the sandbox's end."""
    sd = sb.state_dir(name)
    sb.pid(name)
    pids = pidfile(name, host_port)
    if sb.alive(sb.read_file(pids)):
        raise ClusterctlError(f"sandbox {name!r} already forwards host port {host_port}",
                              f"stop it first: clusterctl sandbox unforward {name} {host_port}")
    ready = sd / f"forward-{int(host_port)}.ready"
    ready.unlink(missing_ok=True)
    p = sb.spawn_helper(["__forward", name, str(int(host_port)), str(int(sandbox_port)), host],
                        sd / f"forward-{int(host_port)}.log", module="clusterctl.control.forwarder")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            pids.write_text(str(p.pid))
            return p.pid
        if p.poll() is not None:
            break
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        p.kill()
    p.wait()
    err = (sb.read_file(sd / f"forward-{int(host_port)}.log", "") or "").splitlines()[-1:]
    raise ClusterctlError(f"could not forward {host}:{host_port} to sandbox {name!r} port {sandbox_port}: "
                          f"{'; '.join(err) or 'no output'}", "pick a free host port")


def stop(path: Path) -> None:
    """Stop the forwarder pidfile `path` names (only if it is still one of ours)."""
    sb.kill_own(sb.read_file(path), sb.FORWARDER_MARK)
    path.unlink(missing_ok=True)


def unforward(name: str, host_port: int) -> None:
    """Stop the forwarder of `host_port`."""
    stop(pidfile(name, host_port))


def serve(name: str, host_port: int, sandbox_port: int, host: str) -> None:
    """Forwarder body: listen on the host, then switch this whole process into the sandbox's network
    namespace (the listening socket stays on the host), so each upstream connection lands inside."""
    pid1 = sb.pid(name)
    listener = socket.create_server((host, host_port), backlog=512)
    if sb.read_file(sb.state_dir(name) / "net") == "private":
        fd = os.open(f"/proc/{pid1}/ns/net", os.O_RDONLY)
        sb.setns(fd)
        os.close(fd)
    (sb.state_dir(name) / f"forward-{host_port}.ready").write_text("")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", sandbox_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
        cw.close()
        uw.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            while sb.alive(pid1):
                await asyncio.sleep(0.5)

    asyncio.run(main())


def _main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "__forward":
        serve(sb.check_name(argv[1]), int(argv[2]), int(argv[3]), argv[4])
        return 0
    print("internal helper of clusterctl sandbox; use 'clusterctl sandbox forward'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
