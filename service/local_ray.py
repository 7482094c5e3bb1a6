"""A private local Ray head with the dashboard, for ``medcurate serve`` without a cluster.

Not ``ray.init()``: that always binds the dashboard agent to port 52365, so of two local Rays
(e.g. a ``medcurate embed`` running beside the service, or a test session's own Ray) the later
one's Jobs API fails with "No available agent to submit job". ``ray start --head --block``
takes free ports for its GCS, agent and client server here and finds this interpreter's
``python`` first on its PATH (the jobs' entry point). Its temp dir is its own,
``<private folder>/ray`` (Ray makes that one mode 0777; the folder around it, which also holds
the token, is 0700): ``ray start`` records its address in ``<temp dir>/ray_current_cluster``,
where under the default /tmp/ray every later ``ray.init()`` on the machine would connect to it
(and, once it is gone, fail). It runs in a session of its own (Ray's shutdown signals its
process group, which must not include the service) and lives as long as the service: stopped
by it, or sent SIGTERM when the service dies first (Linux).

**Not loopback-only.** Only the dashboard (Jobs API) and Serve's HTTP proxy honour 127.0.0.1:
``ray start`` swaps ``--node-ip-address=127.0.0.1`` for the machine's routable address, and
the GCS, raylet, dashboard agent, runtime-env agent, Ray client server, every worker's gRPC
server (Serve's included) and Ray's Prometheus exporters listen on every interface or on that
address, whatever the flags say. Several of them run code for whoever connects (the agent's
job endpoint, the client server, the GCS). So the head runs with **Ray token authentication**
by default: a fresh random token, written (mode 0600) into the private folder, named to the
head (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``) and to this process (the driver); the
raylet's workers, job drivers and Serve replicas inherit both from the head's environment.
Every Ray gRPC and HTTP endpoint then refuses a caller without it (HTTP 401/403, gRPC
UNAUTHENTICATED); what still answers is read-only: the Prometheus exporters (autoscaler,
dashboard, agent: metrics) and the gRPC health check. ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN``
that this process inherits are overridden for the local head. ``token_auth=False``
(``medcurate serve --insecure-no-ray-auth``) runs it with ``RAY_AUTH_MODE=disabled`` instead:
anyone who reaches the machine can then run code as this user through it.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from medcurate.errors import MedcurateError

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1
TOKEN_FILE = "auth_token"  # in the head's private folder, beside its temp dir
INSECURE_WARNING = (
    "WARNING: the local Ray runs WITHOUT token authentication (--insecure-no-ray-auth). Its "
    "GCS, raylet, agents and client server listen on every interface (not only 127.0.0.1) and "
    "run code for whoever connects: anyone who reaches this machine can run commands as "
    "this user. Use it only on a machine nobody else can reach.")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tie_to_parent() -> None:
    """Runs in the head's process before ``ray start``: SIGTERM if the service dies first."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def write_token(folder: str) -> Path:
    """A fresh random token in ``folder/auth_token``, readable by this user only."""
    path = Path(folder) / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(secrets.token_hex(32))
    return path


def use_auth_env(values: dict[str, str]) -> None:
    """Make this process a client of a Ray with ``values`` (``RAY_AUTH_MODE`` and, in token
    mode, ``RAY_AUTH_TOKEN_PATH``): the environment, and Ray's cached config and token, which
    were read from the environment when first used."""
    os.environ.update(values)
    if "RAY_AUTH_TOKEN_PATH" in values:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class LocalHead:
    """``auth_env``: what a client of this head needs in its environment (``RAY_AUTH_MODE``,
    and ``RAY_AUTH_TOKEN_PATH`` in token mode); :meth:`__init__` puts it in this process's."""

    def __init__(self, dashboard_port: int, token_auth: bool = True):
        self.address = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.private_dir = tempfile.mkdtemp(prefix="medcurate-ray-")  # mode 0700
        self.temp_dir = os.path.join(self.private_dir, "ray")  # Ray chmods it to 0777
        self.token_auth = token_auth
        self.token_path = write_token(self.private_dir) if token_auth else None
        self.auth_env = ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
                         if token_auth else {"RAY_AUTH_MODE": "disabled"})
        use_auth_env(self.auth_env)  # the driver must match the head
        env = {**os.environ,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")  # its jobs die with it anyway
        # Prometheus exporters of the autoscaler and the dashboard (read-only, no token, on
        # every interface): free ports, not Ray's fixed 44217 / 44227 that another Ray may hold
        env["AUTOSCALER_METRIC_PORT"], env["DASHBOARD_METRIC_PORT"] = str(free_port()), \
            str(free_port())
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
        """Until the dashboard answers (the GCS is up before it). Any HTTP answer counts: in
        token mode ``/api/version`` is 401 without the token."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                shutil.rmtree(self.private_dir, ignore_errors=True)
                raise MedcurateError(f"the local Ray did not start (exit {self.process.returncode}"
                                     "; its message is above); is the dashboard port free and "
                                     "outside Ray's worker ports 10002-19999?")
            try:
                with _DIRECT.open(f"{self.dashboard}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:  # answering
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
        shutil.rmtree(self.private_dir, ignore_errors=True)  # the token with it


def start_local_head(dashboard_port: int, token_auth: bool = True) -> LocalHead:
    head = LocalHead(dashboard_port, token_auth)
    head.wait()
    return head
