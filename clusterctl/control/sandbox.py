"""Boot a real systemd as PID 1 of an isolated namespace sandbox, for users and for our tests.

Many machines (containers, CI runners, these dev VMs) have systemd installed but not running as PID 1,
so `systemctl` has nothing to talk to. A sandbox boots `/lib/systemd/systemd` as PID 1 of new pid,
mount, uts, ipc, cgroup and (by default) network namespaces. Booting it on the host's own root once
emptied the host's /tmp, so the host's files are never exposed writable:

* root = overlayfs (lowerdir=/, upper and work dirs in the state dir), entered with pivot_root;
* fresh /proc (kernel knobs read-only), read-only sysfs, a minimal private /dev whose console is a pty
  owned by a host-side supervisor (console.log), tmpfs /run and /tmp;
* a cgroup namespace rooted at `clusterctl-sandbox.NAME/payload` in every host hierarchy, mirroring the
  host's layout (hybrid v1 + cgroup2 here: MemoryCurrent works, CPUUsageNSec does not; `cgroup="unified"`
  mounts cgroup2 alone, which flips that);
* a capability bounding set without module loading, clock, raw I/O, audit, bpf ... for PID 1 and for
  every `exec`;
* a minimal boot target wanting only journald; every unit the stock targets pull in, every generator and
  a list of units that touch kernel-global state are masked.

Networking: `net="private"` (default) gives each sandbox its own loopback-only network namespace, so
several sandboxes can listen on the same port. Reach it from the host three ways: `netexec()` runs a
host program (wrk, curl, the venv's python) inside just that network namespace; `netns()`/`connect()`
move one thread of the calling Python process there; `clusterctl.control.forwarder` starts a small host process that
accepts on the host's 127.0.0.1:HOSTPORT and connects to the sandbox's 127.0.0.1:PORT (it binds its
listening socket on the host, then setns()es into the sandbox's network namespace, so every socket it
creates afterwards lives there). `net="host"` shares the host's network instead: simplest, but ports
then clash with the host and with other sandboxes, and CAP_NET_ADMIN is dropped.

Several sandboxes can run at once; each has its state under `$CLUSTERCTL_SANDBOX_DIR/NAME` (default
/var/tmp/clusterctl-sandbox). `down()` kills PID 1 (which ends the whole pid namespace), the forwarders,
and removes the cgroups and the overlay.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import tty
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clusterctl import proc
from clusterctl.control.plan import NAME_RE
from clusterctl.errors import ClusterctlError, CommandError

SYSTEMD = "/lib/systemd/systemd"
# Port forwarders (forwarder.py) are host processes started with spawn_helper: their pidfiles in the state dir
# and the word their command line carries, so that down() ends them without importing what builds on us.
FORWARDER_PIDFILES = "forward-*.pid"
FORWARDER_MARK = b"__forward"
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER = "clusterctl"
TARGET = "clusterctl-sandbox.target"
UNIT_DIRS = ("/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system")
GENERATOR_DIRS = ("/lib/systemd/system-generators", "/usr/lib/systemd/system-generators",
                  "/etc/systemd/system-generators")
NAMESPACES = ("pid", "mnt", "uts", "ipc", "cgroup", "net")

Net = Literal["private", "host"]
CgroupLayout = Literal["hybrid", "unified"]

# Kept although the stock targets want them: the sandbox's only boot-time services.
KEEP = frozenset({"systemd-journald.socket", "systemd-journald-dev-log.socket", "systemd-journald.service"})
# Units that touch kernel-global or host state: masked even if nothing pulls them in today.
DANGEROUS = frozenset("""
systemd-sysctl.service systemd-modules-load.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
proc-sys-fs-binfmt_misc.mount systemd-remount-fs.service systemd-random-seed.service systemd-udevd.service
systemd-udevd-control.socket systemd-udevd-kernel.socket systemd-udev-trigger.service
systemd-udev-settle.service systemd-hwdb-update.service systemd-timesyncd.service
systemd-time-wait-sync.service systemd-networkd.service systemd-networkd.socket
systemd-networkd-wait-online.service systemd-resolved.service networking.service ifupdown-pre.service
ifup@.service systemd-pstore.service systemd-fsck-root.service systemd-fsck@.service
systemd-quotacheck.service quotaon.service systemd-repart.service systemd-growfs-root.service
systemd-boot-update.service systemd-firstboot.service systemd-machine-id-commit.service
systemd-hibernate-resume@.service kmod-static-nodes.service systemd-tmpfiles-setup-dev.service
dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount
sys-fs-fuse-connections.mount apparmor.service keyboard-setup.service console-setup.service setvtrgb.service
systemd-vconsole-setup.service getty@.service serial-getty@.service console-getty.service
container-getty@.service getty-static.service systemd-journald-audit.socket systemd-journal-flush.service
systemd-logind.service dbus.service dbus.socket systemd-ask-password-wall.path
systemd-ask-password-console.path systemd-pcrphase.service systemd-pcrphase-sysinit.service
systemd-tmpfiles-setup.service systemd-tmpfiles-clean.timer systemd-sysusers.service
systemd-update-utmp.service systemd-update-utmp-runlevel.service ldconfig.service swap.target
cryptsetup.target veritysetup.target integritysetup.target remote-fs.target systemd-coredump.socket
systemd-initctl.socket e2scrub_reap.service postgresql.service cron.service ssh.service
""".split())  # noqa: SIM905
# Capabilities no process in the sandbox may ever hold (bounding set of PID 1 and of every exec).
CAP_DROP = ("sys_module", "sys_time", "sys_rawio", "wake_alarm", "syslog", "mac_admin", "mac_override",
            "block_suspend", "sys_pacct", "audit_control", "audit_read", "bpf", "perfmon")

TARGET_UNIT = """[Unit]
Description=clusterctl sandbox: minimal boot target (journald only)
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald.service
After=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald.service
AllowIsolate=yes
"""

JOURNALD_CONF = """[Journal]
Storage=volatile
RateLimitIntervalSec=0
RuntimeMaxUse=128M
ForwardToSyslog=no
ForwardToConsole=no
"""

# Runs as PID 1 of the new pid namespace, inside the new mount/uts/ipc/cgroup[/net] namespaces, still on
# the host's root: builds the isolated root and execs systemd. Every value arrives as an argument or a
# file in the state dir; nothing is interpolated into this text.
INIT_SH = r"""#!/bin/bash
set -euo pipefail
S="$1"; CONSOLE="$2"; SYSTEMD="$3"; INNER_PATH="$4"; NAME="$5"; TARGET="$6"; CONTAINER="$7"
R="$S/root"; CAPDROP="$(cat "$S/capdrop")"
# libmount would otherwise create /run/mount/utab on the HOST's /run before we pivot
export LIBMOUNT_UTAB="$S/utab" LIBMOUNT_MTAB=/proc/self/mounts
trap 'echo "clusterctl-sandbox-init: FAILED at line $LINENO" >&2' ERR
for _ in $(seq 1 400); do [ -e "$S/go" ] && break; sleep 0.025; done
[ -e "$S/go" ] || { echo "clusterctl-sandbox-init: no go signal from the supervisor" >&2; exit 1; }
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$R"
# /proc: fresh (this pid ns), kernel knobs read-only
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
for p in sys sysrq-trigger irq bus; do
  [ -e "$R/proc/$p" ] || continue
  mount --bind "$R/proc/$p" "$R/proc/$p"
  mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/$p"
done
# /sys: fresh and read-only; own tmpfs for /sys/fs/cgroup with the cgroup-ns-rooted hierarchies
mount -t sysfs -o nosuid,nodev,noexec sysfs "$R/sys"
if [ "$(cat "$S/cgroup-layout")" = unified ]; then
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
else
  mount -t tmpfs -o nosuid,nodev,noexec,mode=755,size=1m tmpfs "$R/sys/fs/cgroup"
  while read -r dir type opts; do
    mkdir -p "$R/sys/fs/cgroup/$dir"
    if [ "$type" = cgroup2 ]; then mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup/$dir"
    else mount -t cgroup -o "nosuid,nodev,noexec,$opts" cgroup "$R/sys/fs/cgroup/$dir"; fi
  done < "$S/cgroup-mounts"
  mount -o remount,ro,nosuid,nodev,noexec,mode=755,size=1m "$R/sys/fs/cgroup"
fi
mount -o remount,bind,ro,nosuid,nodev,noexec "$R/sys"
# /dev: private and minimal: no block devices, kmsg, watchdog or real console
mount -t tmpfs -o nosuid,mode=755,size=4m tmpfs "$R/dev"
for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  name=${n%%:*}; mm=${n#*:}; mknod -m 666 "$R/dev/$name" c "${mm%%:*}" "${mm#*:}"
done
mkdir -m 755 "$R/dev/pts"; mkdir -m 1777 "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/dev/shm"
mount -t mqueue -o nosuid,nodev,noexec mqueue "$R/dev/mqueue"
ln -s /proc/self/fd "$R/dev/fd"; ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
touch "$R/dev/console"; mount --bind "$CONSOLE" "$R/dev/console"
# volatile /run and /tmp
mount -t tmpfs -o nosuid,nodev,mode=755,size=512m tmpfs "$R/run"
mkdir -m 1777 "$R/run/lock"
mount -t tmpfs -o nosuid,nodev,mode=1777,size=2g tmpfs "$R/tmp"
# user binds: NUL-separated (src, dst, mode) triples, so any path works
while IFS= read -r -d '' src && IFS= read -r -d '' dst && IFS= read -r -d '' mode; do
  if [ -d "$src" ]; then mkdir -p "$R$dst"; else mkdir -p "$(dirname "$R$dst")"; touch "$R$dst"; fi
  mount --bind "$src" "$R$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$R$dst"; fi
done < "$S/binds"
cd "$R"; pivot_root . .; umount -l .; cd /
exec /usr/bin/env -i container="$CONTAINER" container_uuid="$(cat /etc/machine-id)" \
  clusterctl_sandbox="$NAME" PATH="$INNER_PATH" LANG=C.UTF-8 TERM=dumb \
  /usr/bin/setpriv --bounding-set "$CAPDROP" -- "$SYSTEMD" --unit="$TARGET"
"""

_NAME_RE = NAME_RE  # a cluster's name is its sandbox's (up), so one rule for both
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.@\\-]+\.(service|socket|target|mount|automount|path|timer|slice|scope)")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def base_dir() -> Path:
    """Where every sandbox keeps its state (`CLUSTERCTL_SANDBOX_DIR` overrides, e.g. for tests)."""
    return Path(os.environ.get("CLUSTERCTL_SANDBOX_DIR", "/var/tmp/clusterctl-sandbox"))


@dataclass(frozen=True)
class Bind:
    """A host path mounted into the sandbox; writes to a rw bind reach the host."""

    src: str
    dst: str
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str | tuple[str, str] | tuple[str, str, bool] | Bind) -> Bind:
        """Accepts `Bind`, `(src, dst[, readonly])` or `"SRC:DST[:ro|rw]"` (DST defaults to SRC)."""
        if isinstance(spec, Bind):
            b = spec
        elif isinstance(spec, tuple):
            b = cls(str(spec[0]), str(spec[1]), bool(spec[2]) if len(spec) > 2 else False)
        else:
            parts = spec.split(":")
            mode = parts.pop() if len(parts) > 1 and parts[-1] in ("ro", "rw") else "rw"
            if len(parts) > 2 or not parts[0]:
                raise ClusterctlError(f"bad bind {spec!r}", "use SRC[:DST][:ro] with absolute paths")
            b = cls(parts[0], parts[1] if len(parts) > 1 else parts[0], mode == "ro")
        src = os.path.abspath(b.src)
        if not os.path.exists(src):
            raise ClusterctlError(f"bind source {src} does not exist", "bind an existing file or directory")
        dst = os.path.normpath(b.dst)
        if not dst.startswith("/") or dst == "/" or "\0" in dst or "\0" in src:
            raise ClusterctlError(f"bad bind destination {b.dst!r}", "use an absolute path other than /")
        return cls(src, dst, b.readonly)


@dataclass(frozen=True)
class SandboxConfig:
    """Everything `up()` needs; written to the state dir before the supervisor starts."""

    name: str = "default"
    binds: tuple[Bind, ...] = ()
    net: Net = "private"
    cgroup: CgroupLayout = "hybrid"
    unmask: tuple[str, ...] = ()
    wants: tuple[str, ...] = ()
    with_dbus: bool = False
    timeout: float = 60.0
    owner: int | None = None  # pid of the process that owns it (tests use it to clean up after a crash)


@dataclass(frozen=True)
class SandboxInfo:
    """What `ls()` reports about one state dir."""

    name: str
    pid: int | None
    net: str
    owner: int | None
    boot_seconds: float | None
    state_dir: Path = field(repr=False)

    @property
    def running(self) -> bool:
        return self.pid is not None


# ---------------------------------------------------------------------------------------------- helpers

def read_file(path: Path, default: str | None = None) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def alive(pid: int | str | None) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return False
    return stat.rsplit(") ", 1)[-1][:1] != "Z"


def check_name(name: str) -> str:
    """Sandbox names become paths and cgroup names; `up` names a sandbox after its cluster, so the rule is the
    clusters' (a letter or digit first: never '.' or '..')."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ClusterctlError(f"bad sandbox name {name!r}",
                              "use 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit "
                              "(e.g. --name test-1)")
    return name


def state_dir(name: str) -> Path:
    return base_dir() / check_name(name)


def check_host() -> None:
    """Fail early, with a fix, when this host cannot run a sandbox."""
    if os.geteuid() != 0:
        raise ClusterctlError("clusterctl sandbox needs root (it creates namespaces and mounts overlayfs)",
                              "run it as root, e.g. with sudo")
    missing = [ns for ns in NAMESPACES if not os.path.exists(f"/proc/self/ns/{ns}")]
    if missing:
        raise ClusterctlError(f"this kernel lacks {', '.join(missing)} namespaces",
                              "use a kernel with CONFIG_PID_NS, CONFIG_NET_NS, CONFIG_CGROUPS ... enabled")
    filesystems = read_file(Path("/proc/filesystems"), "") or ""
    if "overlay" not in filesystems.split():
        raise ClusterctlError("overlayfs is not available", "run 'modprobe overlay' on the host")
    if not os.access(SYSTEMD, os.X_OK):
        raise ClusterctlError(f"{SYSTEMD} not found", "install systemd (apt-get install systemd)")
    for tool in ("unshare", "nsenter", "setpriv", "mount"):
        proc.which(tool, fix="install util-linux and mount")


def _running_pid(name: str) -> int | None:
    """Host pid of the sandbox's PID 1, after checking it really is this sandbox's systemd."""
    text = read_file(state_dir(name) / "pid")
    if not text:
        return None
    try:
        if os.readlink(f"/proc/{text}/ns/pid") == os.readlink("/proc/self/ns/pid"):
            return None
        env = Path(f"/proc/{text}/environ").read_bytes().split(b"\0")
        cmd = Path(f"/proc/{text}/cmdline").read_bytes()
    except OSError:
        return None
    if f"clusterctl_sandbox={name}".encode() in env and b"systemd" in cmd:
        return int(text)
    return None


def pid(name: str) -> int:
    """Host pid of the running sandbox's PID 1; a ClusterctlError if it does not exist or is down."""
    if not state_dir(name).is_dir():
        raise ClusterctlError(f"sandbox {name!r} does not exist",
                              f"start it: clusterctl sandbox up --name {name}")
    found = _running_pid(name)
    if found is None:
        raise ClusterctlError(f"sandbox {name!r} is not running",
                              f"clusterctl sandbox down {name}; clusterctl sandbox up --name {name}")
    return found


def is_running(name: str) -> bool:
    return _running_pid(name) is not None


def ls() -> list[SandboxInfo]:
    """Every sandbox with a state dir, running or not."""
    base = base_dir()
    if not base.is_dir():
        return []
    out = []
    for d in sorted(base.iterdir()):
        if not d.is_dir() or not _NAME_RE.fullmatch(d.name):
            continue
        owner = read_file(d / "owner")
        boot = read_file(d / "boot_seconds")
        out.append(SandboxInfo(d.name, _running_pid(d.name), read_file(d / "net", "?") or "?",
                               int(owner) if owner else None, float(boot) if boot else None, d))
    return out


# ------------------------------------------------------------------------------------------------ exec

def exec_argv(name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              net: bool = True) -> list[str]:
    """The host command line that runs `argv` inside: same namespaces, a clean environment, and the
    capability bounding set of the sandbox's PID 1 (so exec cannot do more than the units can)."""
    if not argv:
        raise ClusterctlError("no command given", "name a command to run inside the sandbox")
    sd = state_dir(name)
    pid1 = pid(name)
    ns = ["nsenter", "-t", str(pid1), "-m", "-u", "-i", "-p", "-C"]
    if net and read_file(sd / "net") == "private":
        ns.append("-n")
    clean = {"PATH": INNER_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "SYSTEMD_PAGER": "",
             "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"}
    for key, value in (env or {}).items():
        if not _ENV_RE.fullmatch(key):
            raise ClusterctlError(f"bad environment variable name {key!r}", "use letters, digits and '_'")
        clean[key] = value
    capdrop = read_file(sd / "capdrop") or ""
    return [*ns, "--", "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in clean.items()),
            "setpriv", "--bounding-set", capdrop, "--", *argv]


def exec(name: str, argv: Sequence[str], *, capture: bool = True, check: bool = True,
         env: Mapping[str, str] | None = None, net: bool = True, input: str | None = None,
         timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside the sandbox (mount, uts, ipc, pid, cgroup and, with `net`, network namespaces)."""
    return proc.run(exec_argv(name, argv, env=env, net=net), capture=capture, check=check, input=input,
                    timeout=timeout)


def netexec(name: str, argv: Sequence[str], *, capture: bool = True, check: bool = True,
            input: str | None = None, timeout: float | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a HOST program (wrk, curl, the venv's python) inside only the sandbox's network namespace,
    so it talks to the sandbox's loopback while seeing the host's files."""
    pid1 = pid(name)
    host_net = read_file(state_dir(name) / "net") == "host"
    cmd = list(argv) if host_net else ["nsenter", "-t", str(pid1), "-n", "--", *argv]
    return proc.run(cmd, capture=capture, check=check, input=input, timeout=timeout, env=env)


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    # os.setns() exists only from Python 3.12; we support 3.11.
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Move the CALLING THREAD into the sandbox's network namespace for the block (sockets created
    inside stay there). A network namespace is per thread, so other threads are unaffected: run one
    load-generator thread per `with netns(...)` block."""
    pid1 = pid(name)
    if read_file(state_dir(name) / "net") == "host":
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid1}/ns/net", os.O_RDONLY)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)
        os.close(target)


def connect(name: str, port: int, host: str = "127.0.0.1", timeout: float | None = 10.0) -> socket.socket:
    """A TCP connection to HOST:PORT as seen from inside the sandbox (its loopback by default)."""
    with netns(name):
        return socket.create_connection((host, port), timeout=timeout)


# ------------------------------------------------------------------------------------------- lifecycle

def _host_hierarchies() -> list[tuple[str, str, str, str]]:
    """(host mount point, dir name, fs type, mount options) of every cgroup fs mounted on the host."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ", 1)
        mountpoint = pre.split()[4]
        fstype, _src, sopts = post.split()[:3]
        if fstype not in ("cgroup", "cgroup2") or not mountpoint.startswith("/sys/fs/cgroup"):
            continue
        opts = [o for o in sopts.split(",") if o not in ("rw", "ro")]
        if fstype == "cgroup" and all(o.startswith("name=") or o in ("xattr", "noprefix", "clone_children")
                                      for o in opts):
            opts = ["none", *opts]  # a named hierarchy without controllers
        out.append((mountpoint, os.path.basename(mountpoint), fstype, ",".join(opts) or "-"))
    return out


def _cgroup_name(name: str) -> str:
    return f"clusterctl-sandbox.{name}"


def _masks(unmask: Sequence[str]) -> set[str]:
    """Everything the stock targets pull in plus DANGEROUS, minus journald and `unmask`."""
    mask = set(DANGEROUS)
    for d in UNIT_DIRS:
        if not os.path.isdir(d):
            continue
        for entry in os.listdir(d):
            path = os.path.join(d, entry)
            if entry.endswith((".wants", ".requires")) and os.path.isdir(path):
                mask.update(os.listdir(path))
    mask -= KEEP
    mask -= set(unmask)
    for unit in list(mask):  # an instance (getty@tty1) is masked through its template too
        prefix, at, rest = unit.partition("@")
        if at and not rest.startswith("."):
            template = f"{prefix}@.{rest.rsplit('.', 1)[-1]}"
            if template not in unmask:
                mask.add(template)
    return mask


def _prepare(cfg: SandboxConfig) -> Path:
    """Write the state dir: overlay dirs, the upper layer's /etc (target, masks, machine-id), cgroups,
    the capability set, the binds and the init script."""
    sd = state_dir(cfg.name)
    for d in ("upper", "work", "root"):
        (sd / d).mkdir(parents=True, exist_ok=True)
    upper = sd / "upper"
    etc_sd = upper / "etc/systemd/system"
    etc_sd.mkdir(parents=True, exist_ok=True)
    (upper / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    (upper / "etc/hostname").write_text(f"sandbox-{cfg.name}\n")
    wants = list(cfg.wants) + (["dbus.socket"] if cfg.with_dbus else [])
    unmask = list(cfg.unmask) + (["dbus.socket", "dbus.service"] if cfg.with_dbus else [])
    (etc_sd / TARGET).write_text(TARGET_UNIT + "".join(f"Wants={w}\nAfter={w}\n" for w in wants))
    (etc_sd / "default.target").symlink_to(TARGET)
    mask = _masks(unmask)
    for unit in sorted(mask):
        if not (etc_sd / unit).is_symlink() and not (etc_sd / unit).exists():
            (etc_sd / unit).symlink_to("/dev/null")
    gen = upper / "etc/systemd/system-generators"
    gen.mkdir(parents=True, exist_ok=True)
    for gd in GENERATOR_DIRS:
        if os.path.isdir(gd):
            for g in os.listdir(gd):
                if not (gen / g).is_symlink():
                    (gen / g).symlink_to("/dev/null")
    jd = upper / "etc/systemd/journald.conf.d"
    jd.mkdir(parents=True, exist_ok=True)
    (jd / "clusterctl-sandbox.conf").write_text(JOURNALD_CONF)
    (sd / "masked.txt").write_text("\n".join(sorted(mask)) + "\n")

    hier = _host_hierarchies()
    if not hier:
        raise ClusterctlError("no cgroup filesystem is mounted under /sys/fs/cgroup",
                              "mount cgroup2 on /sys/fs/cgroup (or the v1 hierarchies)")
    if cfg.cgroup == "unified":
        hier = [h for h in hier if h[2] == "cgroup2"]
        if not hier:
            raise ClusterctlError("cgroup='unified' needs cgroup2 mounted on the host", "use cgroup='hybrid'")
    (sd / "cgroup-layout").write_text(cfg.cgroup)
    (sd / "cgroup-mounts").write_text("".join(f"{d} {t} {o}\n" for _mp, d, t, o in hier))
    (sd / "cgroup-host").write_text("".join(f"{mp}\n" for mp, *_ in hier))
    for mp, _d, fstype, opts in hier:
        top = Path(mp) / _cgroup_name(cfg.name)
        for p in (top, top / "payload"):
            p.mkdir(exist_ok=True)
            if fstype == "cgroup" and "cpuset" in opts.split(","):
                for key in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset starts empty: inherit
                    (p / key).write_text((p.parent / key).read_text())
    caps = list(CAP_DROP) + (["net_admin"] if cfg.net == "host" else [])
    (sd / "capdrop").write_text(",".join("-" + c for c in caps))
    (sd / "net").write_text(cfg.net)
    (sd / "binds").write_bytes(b"".join(
        f"{b.src}\0{b.dst}\0{'ro' if b.readonly else 'rw'}\0".encode() for b in cfg.binds))
    (sd / "init.sh").write_text(INIT_SH)
    if cfg.owner is not None:
        (sd / "owner").write_text(str(cfg.owner))
    return sd


def spawn_helper(args: list[str], logfile: Path, module: str = "clusterctl.control.sandbox") -> subprocess.Popen[bytes]:
    """Start `python -m MODULE ARGS` detached (own session, cwd /, output to `logfile`), so it outlives the
    caller and works from an installed package as well as from a checkout."""
    pkg_parent = str(Path(__file__).resolve().parent.parent.parent)  # the directory holding clusterctl/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    with open(logfile, "ab") as log:
        return proc.spawn([sys.executable, "-m", module, *args], stdout=log, stderr=log, env=env,
                          cwd="/", new_session=True)


def up(name: str = "default", binds: Sequence[Bind | tuple[str, str] | tuple[str, str, bool] | str] = (), *,
       net: Net = "private", cgroup: CgroupLayout = "hybrid", unmask: Sequence[str] = (),
       wants: Sequence[str] = (), with_dbus: bool = False, timeout: float = 60.0,
       owner: int | None = None) -> float:
    """Boot sandbox `name` and wait until `systemctl is-system-running` says running or degraded.

    Returns the boot time in seconds. A dead leftover with the same name (from a crash) is cleaned up
    first; a running one is an error. On failure the error carries the console log's tail and
    `systemctl --failed`, and the state dir is kept for inspection.
    """
    check_name(name)
    if net not in ("private", "host"):
        raise ClusterctlError(f"bad net {net!r}", "use net='private' or net='host'")
    if cgroup not in ("hybrid", "unified"):
        raise ClusterctlError(f"bad cgroup layout {cgroup!r}", "use 'hybrid' or 'unified'")
    for unit in (*unmask, *wants):
        if not _UNIT_RE.fullmatch(unit):
            raise ClusterctlError(f"bad unit name {unit!r}", "give full unit names such as dbus.socket")
    for unit in wants:
        template = re.sub(r"@[^.]+\.", "@.", unit)
        if not any(os.path.exists(os.path.join(d, u)) for d in UNIT_DIRS for u in (unit, template)):
            raise ClusterctlError(f"--wants {unit}: no such unit in {', '.join(UNIT_DIRS)}",
                                  "name an installed unit (systemctl list-unit-files lists them), e.g. dbus.socket")
    if not timeout > 0:
        raise ClusterctlError(f"--timeout {timeout:g} leaves no time to boot", "give it seconds, e.g. --timeout 60")
    cfg = SandboxConfig(name, tuple(Bind.parse(b) for b in binds), net, cgroup, tuple(unmask), tuple(wants),
                        with_dbus, timeout, owner)
    check_host()
    sd = state_dir(name)
    if sd.exists():
        if _running_pid(name) or alive(read_file(sd / "supervisor.pid")):
            raise ClusterctlError(f"sandbox {name!r} is already running",
                                  f"use it, or stop it first: clusterctl sandbox down {name}")
        down(name, missing_ok=True)
    t0 = time.monotonic()
    sd.mkdir(parents=True, exist_ok=True)
    try:
        _prepare(cfg)
    except BaseException:
        down(name, missing_ok=True)
        raise
    # record the pid here too: a down() racing the helper's start-up must still find and stop it
    helper = spawn_helper(["__supervise", name], sd / "supervisor.log")
    (sd / "supervisor.pid").write_text(str(helper.pid))
    deadline = t0 + timeout
    state = ""
    while time.monotonic() < deadline:
        if (sd / "exit").exists():
            break
        if _running_pid(name):
            try:
                state = exec(name, ["systemctl", "is-system-running"], check=False, timeout=10).stdout.strip()
            except CommandError:  # a timeout while PID 1 is busy booting: ask again
                continue
            if state in ("running", "degraded"):
                dt = time.monotonic() - t0
                (sd / "boot_seconds").write_text(f"{dt:.3f}")
                return dt
        time.sleep(0.05)
    failed = ""
    if _running_pid(name):
        with contextlib.suppress(CommandError):
            failed = exec(name, ["systemctl", "--failed"], check=False, timeout=10).stdout
    console = (read_file(sd / "console.log", "") or "")[-3000:]
    sup_log = (read_file(sd / "supervisor.log", "") or "")[-1000:]
    down(name, keep=True, missing_ok=True)
    why = "timed out" if time.monotonic() >= deadline else "PID 1 exited"
    raise ClusterctlError(
        f"sandbox {name!r} did not boot ({why}, state={state!r})\n"
        f"--- console ({sd}/console.log) ---\n{console}\n--- systemctl --failed ---\n{failed}"
        + (f"--- supervisor ---\n{sup_log}\n" if sup_log else ""),
        f"read {sd}/console.log; raise --timeout if the machine is slow; `clusterctl sandbox down {name}` removes it")


def _kill_cgroup_procs(name: str) -> None:
    """SIGKILL whatever is still in this sandbox's cgroups (only ever processes the sandbox started)."""
    for mp in (read_file(state_dir(name) / "cgroup-host", "") or "").split():
        top = Path(mp) / _cgroup_name(name)
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            for p in (read_file(procs, "") or "").split():
                with contextlib.suppress(OSError):
                    os.kill(int(p), signal.SIGKILL)


def _rm_cgroups(name: str) -> list[str]:
    """Remove the sandbox's cgroups in every hierarchy, deepest first; returns those still busy."""
    left = []
    for mp in (read_file(state_dir(name) / "cgroup-host", "") or "").split():
        top = Path(mp) / _cgroup_name(name)
        if not top.is_dir():
            continue
        for _ in range(100):
            busy = False
            for root, _dirs, _files in os.walk(top, topdown=False):
                try:
                    os.rmdir(root)
                except FileNotFoundError:
                    pass
                except OSError:
                    busy = True
            if not busy:
                break
            time.sleep(0.05)
        if top.is_dir():
            left.append(str(top))
    return left


def kill_own(pid_text: str | None, marker: bytes) -> None:
    """SIGKILL `pid_text` only if it is alive and its command line shows it is ours (pids get reused)."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        if alive(pid_text) and marker in Path(f"/proc/{pid_text}/cmdline").read_bytes():
            os.kill(int(pid_text), signal.SIGKILL)  # type: ignore[arg-type]


def down(name: str, *, keep: bool = False, missing_ok: bool = False) -> None:
    """Stop sandbox `name`: SIGKILL its PID 1 (ending the whole pid namespace) and its forwarders,
    remove its cgroups and, unless `keep`, its state dir (overlay included)."""
    sd = state_dir(name)
    if not sd.is_dir():
        if missing_ok:
            return
        raise ClusterctlError(f"sandbox {name!r} does not exist",
                              "see the existing ones: clusterctl sandbox ls")
    supervisor = read_file(sd / "supervisor.pid")
    pid1 = _running_pid(name)
    if pid1:
        # SIGKILL to a pid namespace's init ends every process in it; unshare reaps it and exits, and
        # then the supervisor, which removes the cgroups
        os.kill(pid1, signal.SIGKILL)
    else:
        # not booted (yet): stop the supervisor first so it cannot start anything after we looked,
        # then unshare, in case the boot failed before systemd was exec'd
        kill_own(supervisor, b"__supervise")
        kill_own(read_file(sd / "unshare.pid"), str(sd).encode())
    for fwd in sd.glob(FORWARDER_PIDFILES):  # forwarder.py's host processes: they serve this sandbox only
        kill_own(read_file(fwd), FORWARDER_MARK)
    for _ in range(200):
        if not alive(supervisor) and not (pid1 and os.path.exists(f"/proc/{pid1}")):
            break
        time.sleep(0.025)
    kill_own(supervisor, b"__supervise")
    _kill_cgroup_procs(name)
    left = _rm_cgroups(name)
    still = [p for p in (supervisor, read_file(sd / "unshare.pid")) if alive(p)]
    if left or still:
        raise ClusterctlError(f"sandbox {name!r}: left behind cgroups {left} and processes {still}",
                              "kill those processes, then run 'clusterctl sandbox down' again")
    if not keep:
        shutil.rmtree(sd, ignore_errors=True)
    else:
        for f in ("pid", "go", "supervisor.pid", "unshare.pid"):
            with contextlib.suppress(FileNotFoundError):
                (sd / f).unlink()


def supervise(name: str) -> None:
    """The detached host process behind a sandbox: owns the console pty (console.log), starts unshare
    in the sandbox's cgroups, and removes the cgroups when the sandbox dies."""
    sd = state_dir(name)
    (sd / "supervisor.pid").write_text(str(os.getpid()))
    net = read_file(sd / "net")
    master, slave = os.openpty()
    tty.setraw(slave)
    slave_path = os.ttyname(slave)
    hosts = (read_file(sd / "cgroup-host", "") or "").split()
    cg = _cgroup_name(name)

    def enter_payload() -> None:  # in the child before exec: the cgroup ns will be rooted here
        for mp in hosts:
            Path(mp, cg, "payload", "cgroup.procs").write_text(str(os.getpid()))

    args = ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts", "--ipc", "--cgroup",
            "--propagation", "private", *(["--net"] if net == "private" else []),
            "--", "/bin/bash", str(sd / "init.sh"), str(sd), slave_path, SYSTEMD, INNER_PATH, name, TARGET,
            CONTAINER]
    child = proc.spawn(args, stdin=slave, stdout=slave, stderr=slave, before_exec=enter_payload)
    (sd / "unshare.pid").write_text(str(child.pid))
    init = None
    for _ in range(400):
        kids = read_file(Path(f"/proc/{child.pid}/task/{child.pid}/children"), "")
        if kids:
            init = kids.split()[0]
            break
        if child.poll() is not None:
            break
        time.sleep(0.01)
    if init:
        # move the host-side unshare parent out of the payload cgroup, so only the sandbox lives there
        for mp in hosts:
            with contextlib.suppress(OSError):
                Path(mp, cg, "cgroup.procs").write_text(str(child.pid))
        (sd / "pid").write_text(init)
        (sd / "go").write_text("")
    # keep our slave fd open: otherwise reading the master fails whenever PID 1 has /dev/console closed
    with open(sd / "console.log", "ab", buffering=0) as log:
        while True:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if data:
                    log.write(data)
                    continue
            if child.poll() is not None:
                break
    (sd / "exit").write_text(str(child.wait()))
    _rm_cgroups(name)


@dataclass(frozen=True)
class Sandbox:
    """A handle on a running sandbox: the module's functions with the name filled in."""

    name: str

    @property
    def pid(self) -> int:
        return pid(self.name)

    def exec(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return exec(self.name, argv, **kwargs)  # type: ignore[arg-type]

    def netexec(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return netexec(self.name, argv, **kwargs)  # type: ignore[arg-type]

    def netns(self) -> contextlib.AbstractContextManager[None]:
        return netns(self.name)

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float | None = 10.0) -> socket.socket:
        return connect(self.name, port, host, timeout)

    def down(self, keep: bool = False) -> None:
        down(self.name, keep=keep, missing_ok=True)


def _main(argv: list[str]) -> int:
    """Entry of the detached supervisor: `python -m clusterctl.control.sandbox __supervise NAME`."""
    if len(argv) == 2 and argv[0] == "__supervise":
        supervise(check_name(argv[1]))
        return 0
    print("internal helper of clusterctl sandbox; use 'clusterctl sandbox'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
