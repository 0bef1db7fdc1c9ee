"""Operations' pure parts: formatting what systemd reports (no systemd needed)."""

from __future__ import annotations

import re

from clusterctl.control.ops import ClusterStatus, InstanceStatus

LINE = re.compile(r'^(clusterctl_[a-z_]+)\{cluster="((?:[^"\\]|\\.)*)"(?:,instance="((?:[^"\\]|\\.)*)")?\} (-?[0-9.e+]+)$')


def _instance(n: str, **kw: object) -> InstanceStatus:
    base: dict[str, object] = dict(instance=n, unit=f"web@{n}.service", pid=100 + int(n), state="active",
                                   sub_state="running", uptime_s=12.5, restarts=1, cpu_s=0.25, cpu_pct=1.0,
                                   memory_bytes=25_165_824, requests=1234567, in_flight=0, errors=2,
                                   status_text="", configured=True)
    base.update(kw)
    return InstanceStatus(**base)  # type: ignore[arg-type]


def test_prometheus_text_format() -> None:
    st = ClusterStatus(name='we"b', where="host", workers=2, balance="shared", listen=["127.0.0.1:8000"],
                       socket_state="active",
                       instances=[_instance("1"), _instance("2", state="failed", sub_state="failed", pid=0,
                                                            uptime_s=None, requests=None, in_flight=None)])
    text = st.to_prometheus()
    assert text.endswith("\n")
    series: dict[tuple[str, str | None], str] = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = LINE.match(line)
        assert m, line
        assert m.group(2) == 'we\\"b'  # label values escaped
        assert m.group(1) in typed  # every series after its TYPE line
        series[(m.group(1), m.group(3))] = m.group(4)
    assert series[("clusterctl_workers", None)] == "2"
    assert series[("clusterctl_worker_up", "1")] == "1.0" and series[("clusterctl_worker_up", "2")] == "0.0"
    assert series[("clusterctl_worker_memory_bytes", "1")] == "25165824"  # exact, not 2.52e+07
    assert series[("clusterctl_worker_requests_total", "1")] == "1234567"
    assert series[("clusterctl_worker_cpu_seconds_total", "2")] == "0.25"
    # what was not reported is left out, not 0; a metric nobody reports has no HELP/TYPE either
    assert ("clusterctl_worker_requests_total", "2") not in series
    assert ("clusterctl_worker_uptime_seconds", "2") not in series
    assert "websockets" not in text


def test_prometheus_goes_alone() -> None:
    from click.testing import CliRunner

    from clusterctl.cli import cli

    for extra in (["--json"], ["--watch"], ["--inventory", "hosts.ini"]):
        result = CliRunner().invoke(cli, ["status", "web", "--prometheus", *extra])
        assert result.exit_code != 0
        assert result.output.strip() == ("Error: --prometheus goes alone (fix: drop --json/--watch/--inventory; "
                                         "a timer or cron job can rewrite a .prom file as often as it likes)")
