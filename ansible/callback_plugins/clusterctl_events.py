"""Ansible stdout callback that prints one JSON object per line for `clusterctl deploy` to read.

Why: parsing Ansible's human output is fragile; the deploy command needs each host's outcome, the task
that failed and why (unreachable, refused key, no python, a release that does not come up) to print one
clear line. Selected by `clusterctl deploy` with ANSIBLE_STDOUT_CALLBACK=clusterctl_events; people running
the playbook themselves keep Ansible's default output.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: clusterctl_events
    type: stdout
    short_description: JSON lines for clusterctl deploy
    description: One JSON object per task result, play start and final stats, for clusterctl to parse.
"""

LIMIT = 65536


def _name(task: Any) -> str:
    """The task's own name, without the "ROLE : " prefix Ansible adds for role tasks."""
    return str(task.name or task.action)


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "clusterctl_events"

    def _emit(self, **event: Any) -> None:
        event["time"] = round(time.time(), 3)
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()

    def _result(self, kind: str, result: Any, **extra: Any) -> None:
        r = result._result
        task = result._task
        self._emit(event=kind, host=result._host.get_name(), task=_name(task), action=task.action,
                   changed=bool(r.get("changed")), msg=str(r.get("msg", ""))[:LIMIT], rc=r.get("rc"),
                   stdout=str(r.get("stdout", ""))[:LIMIT], stderr=str(r.get("stderr", ""))[-LIMIT:],
                   module_stderr=str(r.get("module_stderr", ""))[-4096:],
                   module_stdout=str(r.get("module_stdout", ""))[-4096:], **extra)

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._emit(event="play", name=play.get_name())

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._emit(event="task", name=_name(task))

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result("ok", result)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result("failed", result, ignored=ignore_errors)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result("unreachable", result)

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._emit(event="skipped", host=result._host.get_name(), task=_name(result._task))

    def v2_playbook_on_no_hosts_matched(self) -> None:
        self._emit(event="no_hosts")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        hosts = {h: stats.summarize(h) for h in sorted(stats.processed)}
        self._emit(event="stats", hosts=hosts)
