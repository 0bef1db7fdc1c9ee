"""Rolling deploys across a fleet through Ansible, end to end, on three test hosts built here.

Each host is a clusterctl sandbox (a real systemd as PID 1 of its own namespaces) running Debian's sshd as
a unit of that systemd. A network namespace made by the test holds a bridge; a veth pair joins each
sandbox's network namespace to it, with addresses in 10.231.0.0/24 that exist only inside these
namespaces. The Ansible controller (`clusterctl deploy` under `ip netns exec`) and the load generator
(client threads that setns() into it) run in that namespace, so no test address is reachable from, or
routed to, anything outside. A key pair is made per run; everything is torn down by the fixture even
when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clusterctl.control import deploy as dp
from clusterctl.control import sandbox as sb
from clusterctl.control.systemd import Systemd
from tests.loadgen import request

pytestmark = pytest.mark.systemd

NAME = "fleetapp"
PORT = 8000
SUBNET = "10.231.0"
HOSTS = ("h1", "h2", "h3")
CLUSTERCTL = str(Path(sys.executable).parent / "clusterctl")
APP = """import os
RELEASE = {release!r}
{extra}
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [RELEASE.encode()]
"""
# Imports fine for `generate`'s import check (run over ssh), fails in the worker systemd starts: the kind
# of failure only the rolling reload's surge instance can catch, so the host must be moved back.
BROKEN = 'if os.environ.get("INVOCATION_ID"):\n    raise ImportError("release r3 cannot start under systemd")'

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Move the calling thread into the network namespace at `path` for the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(target, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(own, 0x40000000)
    finally:
        os.close(own)
        os.close(target)


@dataclass
class Fleet:
    ns: str
    tmp: Path
    hosts: dict[str, sb.Sandbox]
    addresses: dict[str, str]
    inventory: Path
    wheels: Path
    env: dict[str, str] = field(default_factory=dict)

    def clusterctl(self, *args: str, ok: bool = True, inventory: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`clusterctl ARGS --inventory INV` as the controller: a process inside the fleet's namespace."""
        argv = ["ip", "netns", "exec", self.ns, CLUSTERCTL, *args, "--inventory", str(inventory or self.inventory)]
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=300, check=False)
        if ok:
            assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def deploy(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.clusterctl("deploy", "--wheels", str(self.wheels), *args, ok=ok)

    def get(self, host: str) -> tuple[int, bytes]:
        with in_netns(f"/run/netns/{self.ns}"):
            return request(PORT, "/", host=self.addresses[host])

    def current(self, host: str) -> str:
        link = Path(f"/proc/{self.hosts[host].pid}/root/opt/{NAME}/current")
        return os.readlink(link).removeprefix("releases/") if link.is_symlink() else ""

    def pids(self, host: str) -> list[str]:
        sd = Systemd(sandbox=self.hosts[host].name)
        return sd.systemctl("show", "-p", "MainPID", f"{NAME}@1.service", f"{NAME}@2.service").stdout.split()


class FleetLoad:
    """Steady load spread round-robin over the hosts, from threads inside the fleet's namespace; each
    request on a new connection so a lost one is an error. Bounded in time and count."""

    def __init__(self, fleet: Fleet, threads: int = 3, rate: float = 120.0, max_seconds: float = 90.0,
                 max_requests: int = 20_000) -> None:
        self.fleet, self.threads, self.interval = fleet, threads, threads / rate
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.ok: Counter[tuple[str, bytes]] = Counter()
        self.errors: list[str] = []
        self._n = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def total(self) -> int:
        return sum(self.ok.values()) + len(self.errors)

    def _run(self, k: int) -> None:
        hosts = list(self.fleet.addresses)
        deadline = time.monotonic() + self.max_seconds
        with in_netns(f"/run/netns/{self.fleet.ns}"):
            i = k
            while not self._stop.is_set() and time.monotonic() < deadline and self.total < self.max_requests:
                host = hosts[i % len(hosts)]
                i += 1
                t0 = time.monotonic()
                try:
                    status, body = request(PORT, "/", timeout=10, host=self.fleet.addresses[host])
                    err = None if status == 200 else f"{host}: HTTP {status}"
                except OSError as e:
                    err, body = f"{host}: {type(e).__name__}: {e}", b""
                with self._lock:
                    if err:
                        self.errors.append(err)
                    else:
                        self.ok[(host, body)] += 1
                time.sleep(max(0.0, self.interval - (time.monotonic() - t0)))

    def __enter__(self) -> FleetLoad:
        for k in range(self.threads):
            t = threading.Thread(target=self._run, args=(k,), daemon=True)
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + 10
        while self.total < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def build_fleet(sandbox_factory: Any, tmp: Path, wheels: Path) -> Iterator[Fleet]:
    """Boot the hosts, wire the network, make the key pair and the inventory; tear it all down after."""
    ns = f"cctl-fleet-{os.getpid()}"
    hosts: dict[str, sb.Sandbox] = {}
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)  # a leftover of ours
    try:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        _ip("-n", ns, "link", "set", "br0", "up")
        key = tmp / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clusterctl-fleet-test", "-f", str(key)],
                       check=True)
        addresses = {}
        for k, h in enumerate(HOSTS, start=1):
            box = sandbox_factory(f"fleet-{h}", binds=[], unmask=["ssh.service"], wants=["ssh.service"])
            hosts[h] = box
            addr = f"{SUBNET}.{10 + k}"
            addresses[h] = addr
            _ip("-n", ns, "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", str(box.pid))
            _ip("-n", ns, "link", "set", h, "master", "br0", "up")
            box.netexec(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
            box.netexec(["ip", "link", "set", "eth0", "up"])
            ssh = Path(f"/proc/{box.pid}/root/root/.ssh")  # the sandbox's own /root (its overlay)
            ssh.mkdir(mode=0o700, exist_ok=True)
            (ssh / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        inventory = tmp / "hosts.yml"
        write_inventory(inventory, addresses, key)
        env = dict(os.environ)
        env.update({"ANSIBLE_HOME": str(tmp / "ansible"), "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"),
                    "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=3s -o ConnectTimeout=5"})
        yield Fleet(ns, tmp, hosts, addresses, inventory, wheels, env)
    finally:
        for box in hosts.values():
            box.down()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def write_inventory(path: Path, addresses: dict[str, str], key: Path, **host_vars: dict[str, Any]) -> Path:
    inv = {"all": {
        "hosts": {h: {"ansible_host": a, **host_vars.get(h, {})} for h, a in addresses.items()},
        "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(key),
                 "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                 "ansible_python_interpreter": "/usr/bin/python3",
                 "clusterctl_name": NAME, "clusterctl_app": f"{NAME}:app", "clusterctl_workers": 2,
                 "clusterctl_listen": [f"0.0.0.0:{PORT}"]}}}
    path.write_text(json.dumps(inv, indent=2))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def fleet(sandbox_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    sandbox_factory.reap_once()  # skips (or fails under CI) where no sandbox can boot
    tmp = tmp_path_factory.mktemp("fleet")
    wheels = tmp / "wheels"
    dp.build_wheels(wheels)  # once for all deploys: clusterctl and its dependencies for the hosts
    yield from build_fleet(sandbox_factory, tmp, wheels)


def release(fleet: Fleet, tag: str, extra: str = "") -> Path:
    d = fleet.tmp / "releases" / tag
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{NAME}.py").write_text(APP.format(release=tag, extra=extra))
    return d


def journal_window(box: sb.Sandbox, since_us: int) -> list[tuple[int, str, str]]:
    """(usec, unit, message) of PID 1's lines about our instances since `since_us`."""
    out = box.exec(["journalctl", "--no-pager", "-o", "json", "_PID=1"]).stdout
    rows = []
    for line in out.splitlines():
        e = json.loads(line)
        if str(e.get("UNIT", "")).startswith(f"{NAME}@") and int(e["__REALTIME_TIMESTAMP"]) >= since_us:
            rows.append((int(e["__REALTIME_TIMESTAMP"]), e["UNIT"], str(e.get("MESSAGE"))))
    return rows


def test_deploy_release_1_to_every_host(fleet: Fleet) -> None:
    r1 = release(fleet, "r1")
    check = fleet.deploy("--release", str(r1), "--serial", "3", "--check")
    assert check.stdout.count("none -> r1-") == 3 and "nothing changed" in check.stdout, check.stdout
    assert all(fleet.current(h) == "" for h in HOSTS)

    out = fleet.deploy("--release", str(r1), "--serial", "3", "--health-url", "/").stdout
    assert "(3 switched, 0 already on it)" in out, out
    rid = fleet.current("h1")
    assert rid.startswith("r1-") and all(fleet.current(h) == rid for h in HOSTS)
    for h in HOSTS:
        assert fleet.get(h) == (200, b"r1")
        root = Path(f"/proc/{fleet.hosts[h].pid}/root/opt/{NAME}/releases/{rid}")
        assert (root / ".complete").is_file() and (root / "venv/bin/clusterctl").exists()
        assert os.stat(root).st_mode & 0o005 == 0o005  # the workers' unprivileged users can enter it

    again = fleet.deploy("--release", str(r1), "--check").stdout  # the same release again is a no-op
    assert again.count(f"{rid} -> {rid} (unchanged)") == 3, again


def test_rolling_deploy_release_2_under_load(fleet: Fleet) -> None:
    r2 = release(fleet, "r2")
    pids = {h: fleet.pids(h) for h in HOSTS}
    since = time.time_ns() // 1000
    with FleetLoad(fleet) as load:
        out = fleet.deploy("--release", str(r2), "--serial", "1", "--health-url", "/").stdout
        deadline = time.monotonic() + 5
        while load.total < 400 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert load.errors == [], load.errors[:5]
    assert sum(load.ok.values()) >= 300
    served = {h for (h, _b) in load.ok}
    assert served == set(HOSTS)
    assert {b for (_h, b) in load.ok} == {b"r1", b"r2"}
    assert "(3 switched" in out, out
    rid = fleet.current("h1")
    assert rid.startswith("r2-") and all(fleet.current(h) == rid for h in HOSTS)
    assert all(fleet.get(h) == (200, b"r2") for h in HOSTS)
    assert all(set(fleet.pids(h)).isdisjoint(pids[h]) for h in HOSTS)  # every worker is a new process

    # one host at a time, in inventory order: host k's reload (systemd's first to last line about its workers:
    # in place, "Reloading" .. "Reloaded") ends before host k+1's begins, read from each host's own journal
    spans = []
    for h in HOSTS:
        events = journal_window(fleet.hosts[h], since)
        reloads = [t for t, u, m in events if m.startswith(("Reloading ", "Reloaded "))]
        assert len(reloads) == 4, (h, events)  # each of the 2 workers in place, none restarted
        spans.append((min(t for t, _u, _m in events), max(t for t, _u, _m in events)))
    assert spans[0][1] < spans[1][0] and spans[1][1] < spans[2][0], spans


def test_broken_release_3_stops_at_the_first_host(fleet: Fleet) -> None:
    r3 = release(fleet, "r3", BROKEN)
    before = {h: (fleet.current(h), fleet.pids(h)) for h in HOSTS}
    with FleetLoad(fleet, max_seconds=60) as load:
        r = fleet.deploy("--release", str(r3), "--serial", "1", "--timeout", "15", ok=False)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("Error: h1: release r3-") and "rolling reload onto the release" in err, r.stderr
    assert "moved back to release r2-" in err and "still run the old code" in err, err
    assert load.errors == [], load.errors[:5]
    assert fleet.current("h1") == before["h1"][0] and fleet.get("h1") == (200, b"r2")
    for h in ("h2", "h3"):  # never switched: same link, same worker processes
        assert (fleet.current(h), fleet.pids(h)) == before[h]
        assert fleet.get(h) == (200, b"r2")


def test_rollback_under_load(fleet: Fleet) -> None:
    with FleetLoad(fleet) as load:
        out = fleet.deploy("--rollback", "--serial", "1", "--health-url", "/").stdout
    assert load.errors == [], load.errors[:5]
    assert "(3 switched" in out, out
    assert all(fleet.current(h).startswith("r1-") for h in HOSTS)
    assert all(fleet.get(h) == (200, b"r1") for h in HOSTS)


def test_status_of_the_fleet(fleet: Fleet) -> None:
    st = json.loads(fleet.clusterctl("status", "--json").stdout)
    rid = fleet.current("h1")
    assert [h["host"] for h in st["hosts"]] == list(HOSTS) and st["name"] == NAME
    rows = [(i["host"], i["instance"], i["release"], i["state"]) for i in st["instances"]]
    assert rows == [(h, i, rid, "active") for h in HOSTS for i in ("1", "2")]
    table = fleet.clusterctl("status").stdout
    assert "3/3 hosts answered, 6 instances" in table and table.count(rid) == 6, table


def test_bad_input_one_clear_message_each(fleet: Fleet) -> None:
    key = fleet.tmp / "id_ed25519"
    other = fleet.tmp / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    cases = {
        "unreachable": ({"h1": fleet.addresses["h1"], "h9": f"{SUBNET}.99"}, key, {},
                        "Error: h9: unreachable over ssh"),
        "wrong key": ({"h1": fleet.addresses["h1"]}, other, {}, "Error: h1: ssh refused the login"),
        "no python": ({"h1": fleet.addresses["h1"]}, key,
                      {"h1": {"ansible_python_interpreter": "/usr/bin/python3-missing"}},
                      "Error: h1: no python on the host (/usr/bin/python3-missing not found)"),
    }
    before = fleet.current("h1")
    for case, (addresses, k, host_vars, expect) in cases.items():
        inv = write_inventory(fleet.tmp / f"bad-{case.replace(' ', '-')}.yml", addresses, k, **host_vars)
        r = fleet.clusterctl("deploy", "--rollback", inventory=inv, ok=False)
        assert r.returncode != 0, (case, r.stdout)
        errors = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith(expect), (case, r.stdout, r.stderr)
    assert fleet.current("h1") == before  # h1 reachable in the unreachable case: prepare failed, nothing moved
