"""``medcurate serve`` as a child process on free ports, with a local Ray of its own: for the
HTTP tests and the load benchmark, which talk to it over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

from service.local_ray import free_port

MEDCURATE = Path(sys.executable).with_name("medcurate")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1


class ServiceProcess:
    """Started on ``__enter__`` (returns once ``GET /v1/health`` answers), stopped on
    ``__exit__``: SIGTERM (the service deletes its app and stops its Ray), then SIGKILL to the
    whole process group. Env vars ``MEDCURATE_*`` and ``RAY_ADDRESS`` of the caller are not
    passed on; ``env`` adds settings (e.g. ``MEDCURATE_SYNC_SELECT_MAX_ROWS``)."""

    def __init__(self, workspace: Path, data_roots: list[Path], tokens_file: Path, log: Path,
                 env: dict[str, str] | None = None, start_timeout_s: float = 240):
        self.port, self.dashboard_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jobs_address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log, self.start_timeout_s = log, start_timeout_s
        self.command = [str(MEDCURATE), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        "--dashboard-port", str(self.dashboard_port), "--workspace",
                        str(workspace), "--tokens-file", str(tokens_file),
                        *[arg for root in data_roots for arg in ("--data-root", str(root))]]
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("MEDCURATE_") and key != "RAY_ADDRESS"}
        self.env.update({"RAY_AUTH_MODE": "disabled", **(env or {})})
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                with _DIRECT.open(f"{self.url}/v1/health", timeout=5):
                    return
            except OSError:  # not listening yet, or no replica yet
                time.sleep(1)
        raise RuntimeError(f"medcurate serve did not come up (exit code {self.process.poll()});"
                           f" its log:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its process group (its Ray head, in a session of its own,
            # gets SIGTERM when the service is gone)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
