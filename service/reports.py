"""Selection reports drawn off the request path, as Ray tasks.

``POST /v1/select`` answers as soon as the selection is published; its ``report.html``
(thumbnails decoded from the collection's files, maps, bars: about a second of CPU, most of
it holding the GIL) is drawn on the first ``GET …/report`` by a Ray task of its own, which
adds it to the selection through the workspace's protocol (``render_report``). Until then
the route answers 202 with ``Retry-After``. The task runs wherever Ray has half a CPU free,
reads and writes only through the workspace (nodes share no disk), and a replica starts at
most one per selection at a time.
"""

from __future__ import annotations

import logging
import os
import threading

from medcurate.errors import MedcurateError
from medcurate.runtime import stage_resources
from medcurate.workspace import Workspace
from service.jobs import PASSED_ENV

logger = logging.getLogger("medcurate.service")


def _draw(workspace_uri: str, selection_id: str) -> bool:
    from medcurate.select.run import render_report

    return render_report(Workspace(workspace_uri), selection_id)


class ReportDrawer:
    """Starts and tracks the report tasks of one replica."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._running: dict[str, object] = {}  # selection id -> the task's ObjectRef
        self._lock = threading.Lock()

    def ready(self, selection_id: str) -> bool:
        """True once the selection has its report; else makes sure a task is drawing it.
        A task that failed is reported once (``MedcurateError`` with its message) and a
        later request starts another."""
        import ray

        from medcurate.select.run import has_report

        if has_report(self.workspace, selection_id):
            return True
        with self._lock:
            task = self._running.get(selection_id)
            if task is not None:
                done, _ = ray.wait([task], timeout=0)
                if not done:
                    return False
                del self._running[selection_id]
                try:
                    ray.get(task)
                except ray.exceptions.RayTaskError as error:
                    if isinstance(error.cause, MedcurateError):
                        raise error.cause from None
                    logger.error("drawing the report of %s failed: %s", selection_id, error)
                    raise RuntimeError("drawing the report failed") from None
                if has_report(self.workspace, selection_id):
                    return True
            self._running[selection_id] = self._start(selection_id)
            return False

    def _start(self, selection_id: str):
        import ray

        resources = stage_resources("report")
        env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        env["OMP_NUM_THREADS"] = str(resources.threads)
        draw = ray.remote(_draw).options(num_cpus=resources.num_cpus, max_retries=1,
                                         runtime_env={"env_vars": env})
        return draw.remote(self.workspace.uri, selection_id)
