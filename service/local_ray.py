"""A private local Ray head with the dashboard, for ``medcurate serve`` without a cluster.

Not ``ray.init()``: that always binds the dashboard agent to port 52365, so of two local Rays
(e.g. a ``medcurate embed`` running beside the service, or a test session's own Ray) the later
one's Jobs API fails with "No available agent to submit job". ``ray start --head --block``
takes free ports for its GCS, agent and client server here, listens on 127.0.0.1 only, finds
this interpreter's ``python`` first on its PATH (the jobs' entry point), and has token auth off
unless ``RAY_AUTH_MODE`` says else. Its temp dir is private: ``ray start`` records its address
in ``<temp dir>/ray_current_cluster``, where under the default /tmp/ray every later
``ray.init()`` on the machine would connect to it (and, once it is gone, fail). It runs in a
session of its own (Ray's shutdown signals its process group, which must not include the
service) and lives as long as the service: stopped by it, or sent SIGTERM when the service
dies first (Linux).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from medcurate.errors import MedcurateError

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tie_to_parent() -> None:
    """Runs in the head's process before ``ray start``: SIGTERM if the service dies first."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalHead:
    def __init__(self, dashboard_port: int):
        self.address = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the driver must match the head
        env = {**os.environ,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")  # its jobs die with it anyway
        self.temp_dir = tempfile.mkdtemp(prefix="medcurate-ray-")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
             f"--port={self.address.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats"],
            env=env, stdout=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_tie_to_parent)  # noqa: PLW1509 - runs before Ray starts any thread

    def wait(self, timeout_s: float = 120) -> None:
        """Until the dashboard answers (the GCS is up before it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MedcurateError(f"the local Ray did not start (exit {self.process.returncode}"
                                     "; its message is above); is the dashboard port free and "
                                     "outside Ray's worker ports 10002-19999?")
            try:
                with _DIRECT.open(f"{self.dashboard}/api/version", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise MedcurateError(f"the local Ray's dashboard {self.dashboard} did not come up in "
                             f"{timeout_s:.0f} s")

    def stop(self, timeout_s: float = 60) -> None:
        """``ray start --block`` drains and stops its node's processes on SIGTERM."""
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_head(dashboard_port: int) -> LocalHead:
    head = LocalHead(dashboard_port)
    head.wait()
    return head
