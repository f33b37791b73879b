# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""A stdout callback that prints one JSON document per ansible-playbook run:
every task's result per host (loop items included) and the play recap.

The tests count ``changed``/``failed`` from it instead of reading Ansible's
text output. (ansible-core ships no JSON callback; ``ansible.posix.json`` is
in a collection.) Use it with ``ANSIBLE_CALLBACK_PLUGINS=<this directory>``
and ``ANSIBLE_STDOUT_CALLBACK=unitgen_json``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ansible.module_utils.common.json import AnsibleJSONEncoder
from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: unitgen_json
type: stdout
short_description: One JSON document per run with every task result and the recap
description:
  - When the run ends, prints one JSON object with the keys C(plays), C(tasks)
    and C(stats). Each task has its name, action and one result per host, with
    C(status) set to C(ok), C(changed), C(failed), C(skipped) or C(unreachable),
    and C(elapsed_s), the seconds from the task's start to that result.
"""


class CallbackModule(CallbackBase):
    """See DOCUMENTATION."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "unitgen_json"

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[dict[str, Any]] = []
        self.by_uuid: dict[str, dict[str, Any]] = {}
        self.plays: list[str] = []

    def v2_playbook_on_play_start(self, play: Any) -> None:  # noqa: ANN401 - Ansible's types
        self.plays.append(play.get_name())

    def _start(self, task: Any) -> None:  # noqa: ANN401
        entry = {"task": task.get_name(), "action": task.action, "play": self.plays[-1:],
                 "hosts": {}, "started": time.monotonic()}
        self.tasks.append(entry)
        self.by_uuid[task._uuid] = entry

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:  # noqa: ANN401
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:  # noqa: ANN401
        self._start(task)

    def _record(self, result: Any, status: str) -> None:  # noqa: ANN401
        task = result._task
        entry = self.by_uuid.get(task._uuid)
        if entry is None:
            self._start(task)
            entry = self.by_uuid[task._uuid]
        data = dict(result._result)
        if status == "ok" and data.get("changed"):
            status = "changed"
        data["status"] = status
        data["elapsed_s"] = round(time.monotonic() - entry["started"], 2)  # since the task started
        entry["hosts"][result._host.get_name()] = data

    def v2_runner_on_ok(self, result: Any) -> None:  # noqa: ANN401
        self._record(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:  # noqa: ANN401
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:  # noqa: ANN401
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:  # noqa: ANN401
        self._record(result, "unreachable")

    def v2_playbook_on_stats(self, stats: Any) -> None:  # noqa: ANN401
        recap = {host: stats.summarize(host) for host in sorted(stats.processed)}
        doc = {"plays": self.plays, "tasks": self.tasks, "stats": recap}
        self._display.display(json.dumps(doc, cls=AnsibleJSONEncoder, sort_keys=True))
