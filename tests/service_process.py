"""``medcurate serve`` as a child process on free ports, with a local Ray of its own: for the
HTTP tests and the load benchmark, which talk to it over real HTTP."""

from __future__ import annotations

import contextlib
import os
import re
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
_TOKEN_PATH = re.compile(r"RAY_AUTH_TOKEN_PATH=(\S+)")  # in the service's start-up message
_AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class ServiceProcess:
    """Started on ``__enter__`` (returns once ``GET /v1/health`` answers), stopped on
    ``__exit__``: SIGTERM (the service deletes its app and stops its Ray), then SIGKILL to the
    whole process group. Env vars ``MEDCURATE_*``, ``RAY_ADDRESS`` and ``RAY_AUTH_*`` of the
    caller are not passed on; ``env`` adds settings (e.g. ``MEDCURATE_SYNC_SELECT_MAX_ROWS``).

    Its local Ray runs with token authentication, as ``medcurate serve`` does by default
    (``ray_auth=False``: ``--insecure-no-ray-auth``). ``ray_auth_env`` is what a client of that
    Ray needs (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH`` of the token the service made);
    while the service is up it is also set in this process's environment (restored on exit), so
    that subprocesses started with ``os.environ`` (``medcurate submit`` / ``jobs``) reach the
    Jobs API. ``client_env()`` adds ``MEDCURATE_JOBS_ADDRESS``."""

    def __init__(self, workspace: Path, data_roots: list[Path], tokens_file: Path, log: Path,
                 env: dict[str, str] | None = None, start_timeout_s: float = 240,
                 ray_auth: bool = True):
        self.port, self.dashboard_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jobs_address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log, self.start_timeout_s, self.ray_auth = log, start_timeout_s, ray_auth
        self.command = [str(MEDCURATE), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        "--dashboard-port", str(self.dashboard_port), "--workspace",
                        str(workspace), "--tokens-file", str(tokens_file),
                        *[arg for root in data_roots for arg in ("--data-root", str(root))],
                        *([] if ray_auth else ["--insecure-no-ray-auth"])]
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("MEDCURATE_") and key != "RAY_ADDRESS"
                    and key not in _AUTH_VARIABLES}
        self.env.update(env or {})
        self.ray_auth_env: dict[str, str] = {}
        self.process: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] | None = None

    def __enter__(self) -> Self:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait()
            self.ray_auth_env = self._read_auth_env()
        except BaseException:
            self.stop()
            raise
        self._saved_env = {name: os.environ.get(name) for name in _AUTH_VARIABLES}
        for name in _AUTH_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(self.ray_auth_env)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self) -> dict[str, str]:
        """What a client of the service's Ray (``medcurate submit``, ``ray job``) needs."""
        return {**self.ray_auth_env, "MEDCURATE_JOBS_ADDRESS": self.jobs_address}

    @property
    def ray_dir(self) -> Path | None:
        """In token mode, the local head's private folder: its token, and Ray's temp dir
        ``ray/`` (which every Ray process of the head names on its command line)."""
        path = self.ray_auth_env.get("RAY_AUTH_TOKEN_PATH")
        return Path(path).parent if path else None

    def _read_auth_env(self) -> dict[str, str]:
        if not self.ray_auth:
            return {"RAY_AUTH_MODE": "disabled"}
        found = _TOKEN_PATH.findall(self.log.read_text(errors="replace"))
        if not found:
            raise RuntimeError("medcurate serve did not name its Ray token file; its log:\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": found[-1]}

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
        if self._saved_env is not None:
            for name, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._saved_env = None
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its process group
            # (its Ray head, in a session of its own, gets SIGTERM when the service is gone)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
