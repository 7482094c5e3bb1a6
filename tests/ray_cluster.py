"""A real two-node Ray cluster on this one machine, for tests that need a cluster: Ray Jobs, work
spread over nodes, a workspace every node reaches.

Two ``ray start --block`` processes, each in a session of its own: a head (GCS, dashboard and
Jobs API, ``node_head`` custom resource) and a worker node joining it (``node_worker``). Every
port is taken free (GCS, dashboard, dashboard agent, runtime-env agent, metrics, node and object
managers; workers on random ports), so the cluster never clashes with another Ray on the
machine: not with ``ray.init()`` (whose dashboard agent takes 52365), not with ``medcurate
serve``'s local head, not with another test session. Each node has a private temp dir (Ray 2.60
allows one per node), so no ``/tmp/ray/ray_current_cluster`` is written that a later
``ray.init()`` elsewhere would pick up. The dashboard listens on 127.0.0.1 only; the rest does
not: Ray replaces ``--node-ip-address=127.0.0.1`` by the machine's address (nodes register with
it) and its GCS, raylets and agents listen on every interface whatever the flags say.

Neither ``ray stop`` (it stops every Ray of the machine, other people's included) nor
``ray.cluster_utils.Cluster`` (its nodes live in the test process and it writes the default
``/tmp/ray/ray_current_cluster``) is used. :meth:`TwoNodeCluster.stop` SIGTERMs the two
``ray start`` processes (which stop their nodes), then SIGKILLs whatever is left of their
process trees and of the processes carrying the cluster's marker variable, and checks that
nothing is. A cluster whose test process died (SIGKILL) is reaped by the next one that starts.

The auth mode comes from ``RAY_AUTH_MODE`` (default ``disabled``) and is given to both nodes
and, through :attr:`TwoNodeCluster.auth_env` / :meth:`TwoNodeCluster.client_env` and the
fixture, to clients. With ``token`` and no ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` set, a
token file is generated in the cluster's folder and ``RAY_AUTH_TOKEN_PATH`` names it everywhere.

    with TwoNodeCluster(env={"AWS_ENDPOINT_URL": ...}) as cluster:
        JobSubmissionClient(cluster.dashboard_url).submit_job(entrypoint="python x.py")

or the session fixture ``two_node_cluster`` (import it and ``two_node_cluster_env`` into a test
module or conftest; override ``two_node_cluster_env`` to give the nodes more environment).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
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

import psutil
import pytest

MARKER = "MEDCURATE_TEST_RAY_CLUSTER"  # every process of the cluster has it in its environment
HEAD_RESOURCE, WORKER_RESOURCE = "node_head", "node_worker"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1
_BIN = Path(sys.executable).parent


class ClusterError(RuntimeError):
    """The cluster did not come up (the message carries the nodes' log tails)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In ``ray start``'s process before exec: SIGTERM when the test process dies first."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no file)"


def marked_processes(predicate) -> list[psutil.Process]:
    """Processes whose ``MARKER`` variable satisfies ``predicate`` (ours: same user). Processes
    that set their title (``ray::DashboardAgent``, the dashboard's modules) overwrite their
    environment block and are not found here: :class:`TwoNodeCluster` also tracks the process
    trees of its nodes."""
    found = []
    for proc in psutil.process_iter():
        try:
            value = proc.environ().get(MARKER)
        except (psutil.Error, OSError):
            continue
        if value is not None and predicate(value):
            found.append(proc)
    return found


def _kill_all(procs: list[psutil.Process], timeout_s: float = 10) -> list[psutil.Process]:
    """SIGKILL and reap; returns those still running."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return alive


def reap_orphaned_clusters() -> int:
    """Kill what is left of test clusters whose test process has died (SIGKILLed pytest, say):
    their marker is ``<owner pid>-<random>``. Returns how many processes were killed."""
    def orphaned(value: str) -> bool:
        owner = value.partition("-")[0]
        return owner.isdigit() and not psutil.pid_exists(int(owner))

    procs = marked_processes(orphaned)
    _kill_all(procs)
    return len(procs)


class _Node:
    def __init__(self, name: str, args: list[str], env: dict, temp_dir: str, log: Path):
        self.name, self.temp_dir, self.log = name, temp_dir, log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(_BIN / "ray"), "start", "--block", *args], env=env, cwd=temp_dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509

    def logs(self) -> str:
        """The tail of ``ray start``'s output and of the node's raylet (and GCS) logs."""
        parts = [f"--- {self.name}: ray start (exit {self.process.poll()}) ---", _tail(self.log)]
        session = Path(self.temp_dir) / "session_latest" / "logs"
        for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err",
                     "dashboard.log"):
            if (session / name).is_file() and (session / name).stat().st_size:
                parts += [f"--- {self.name}: {name} ---", _tail(session / name, 15)]
        return "\n".join(parts)


class TwoNodeCluster:
    """A head and one worker node on this machine, each ``ray start --block`` in its own session.

    ``head_cpus`` / ``worker_cpus``: logical CPUs of each node. The default (2 + 2) leaves the
    head a whole CPU for tasks beside a job's driver, which declares a fraction of one, so Ray
    Data's default SPREAD strategy puts work on both nodes while the driver sits on the head (as does ``python`` of a job's entry point: this
    interpreter, first on the nodes' PATH; the driver's working directory is the head's temp
    dir). ``env``: extra variables for every process of both nodes (Ray workers, job drivers):
    e.g. AWS credentials and ``AWS_ENDPOINT_URL``.

    Attributes once started: ``address`` (GCS, ``127.0.0.1:PORT``), ``dashboard_url``
    (``http://127.0.0.1:PORT``, the Jobs API), ``head_node_id``, ``worker_node_id``,
    ``node_ids`` (both, hex), ``auth_mode``, ``start_seconds``.
    """

    def __init__(self, head_cpus: int = 2, worker_cpus: int = 2, env: dict | None = None,
                 object_store_mb: int = 128, start_timeout_s: float = 120,
                 stop_timeout_s: float = 30):
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.extra_env = dict(env or {})
        self.object_store_mb = object_store_mb
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.auth_mode = os.environ.get("RAY_AUTH_MODE") or "disabled"
        self.marker = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.address = self.dashboard_url = None
        self.head_node_id = self.worker_node_id = None
        self.node_ids: list[str] = []
        self.start_seconds: float | None = None
        self.base_dir: str | None = None
        self._auth_env: dict[str, str] = {}
        self._nodes: list[_Node] = []
        self._last_error: str | None = None

    # -- environment -----------------------------------------------------------------------

    def _setup_auth(self) -> None:
        self._auth_env = {"RAY_AUTH_MODE": self.auth_mode}
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            if os.environ.get(name):
                self._auth_env[name] = os.environ[name]
        if self.auth_mode == "token" and len(self._auth_env) == 1:
            token = Path(self.base_dir) / "auth_token"
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
            self._auth_env["RAY_AUTH_TOKEN_PATH"] = str(token)

    @property
    def auth_env(self) -> dict[str, str]:
        """``RAY_AUTH_MODE`` (and the token variable in token mode) the nodes run with."""
        return dict(self._auth_env)

    def client_env(self) -> dict[str, str]:
        """What a client process (``medcurate submit``, ``ray job submit``) needs in its
        environment: the auth mode (and token) of the cluster and its Jobs API address."""
        return {**self._auth_env, "MEDCURATE_JOBS_ADDRESS": self.dashboard_url}

    def node_env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, **self._auth_env, MARKER: self.marker,
               # `python` of a job's entry point is this interpreter, with medcurate installed
               "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "RAY_DISABLE_USAGE_STATS": "1",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}
        for name in ("RAY_ADDRESS", "RAY_NAMESPACE", "PYTEST_CURRENT_TEST"):
            env.pop(name, None)
        return env

    # -- start / stop ----------------------------------------------------------------------

    def _common_args(self, name: str, cpus: int, resource: str) -> tuple[str, list[str]]:
        temp_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=self.base_dir)
        return temp_dir, [  # Ray turns 127.0.0.1 into the machine's address all the same
            "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}",
            "--num-gpus=0", f"--resources={json.dumps({resource: 1})}",
            f"--object-store-memory={self.object_store_mb << 20}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
            "--log-style=record", "--log-color=false"]

    def start(self) -> TwoNodeCluster:
        if self._nodes:
            raise ClusterError("already started")
        started = time.monotonic()
        reap_orphaned_clusters()
        self.base_dir = tempfile.mkdtemp(prefix="mc-ray-")  # short: Ray's socket paths < 108
        self._setup_auth()
        env = self.node_env()
        try:
            gcs_port, dashboard_port = free_port(), free_port()
            self.address = f"127.0.0.1:{gcs_port}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
            temp_dir, args = self._common_args("head", self.head_cpus, HEAD_RESOURCE)
            self._nodes.append(_Node("head", ["--head", f"--port={gcs_port}", *args,
                                              "--include-dashboard=true",
                                              "--dashboard-host=127.0.0.1",
                                              f"--dashboard-port={dashboard_port}",
                                              f"--ray-client-server-port={free_port()}"],
                                     env, temp_dir, Path(self.base_dir) / "head.log"))
            self._wait_for(self._dashboard_up, "the head's dashboard to answer")
            temp_dir, args = self._common_args("worker", self.worker_cpus, WORKER_RESOURCE)
            self._nodes.append(_Node("worker", [f"--address={self.address}", *args], env,
                                     temp_dir, Path(self.base_dir) / "worker.log"))
            self._wait_for(self._both_nodes_alive, "both nodes to be alive with their CPUs")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            dead = [node for node in self._nodes if node.process.poll() is not None]
            if dead:
                raise ClusterError(f"ray start of the {dead[0].name} exited while waiting for "
                                   f"{what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        last = f" (last error: {self._last_error})" if self._last_error else ""
        raise ClusterError(f"timed out after {self.start_timeout_s:.0f} s waiting for {what}"
                           f"{last}\n{self.logs()}")

    def _dashboard_up(self) -> bool:
        try:
            with _DIRECT.open(f"{self.dashboard_url}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:  # answering: 401 without a token in token mode
            return True
        except OSError:
            return False

    def nodes(self) -> list[dict]:
        """The cluster's alive nodes as the dashboard's state API lists them."""
        from ray.util.state import list_nodes

        with _client_env(self._auth_env):
            return [node for node in (n if isinstance(n, dict) else n.__dict__ for n in
                                      list_nodes(address=self.dashboard_url, detail=True,
                                                 raise_on_missing_output=False, timeout=10))
                    if node.get("state") == "ALIVE"]

    def _both_nodes_alive(self) -> bool:
        try:
            nodes = self.nodes()
        except Exception as exc:  # noqa: BLE001 - the state API is not up yet
            self._last_error = f"{type(exc).__name__}: {str(exc)[:500]}"
            return False
        by_resource = {}
        for node in nodes:
            total = node.get("resources_total") or {}
            for resource in (HEAD_RESOURCE, WORKER_RESOURCE):
                if total.get(resource) and total.get("CPU"):
                    by_resource[resource] = node["node_id"]
        if len(by_resource) < 2:
            return False
        self.head_node_id, self.worker_node_id = by_resource[HEAD_RESOURCE], \
            by_resource[WORKER_RESOURCE]
        self.node_ids = [self.head_node_id, self.worker_node_id]
        return True

    def logs(self) -> str:
        return "\n".join(node.logs() for node in self._nodes)

    def processes(self) -> list[psutil.Process]:
        """Every live process of the cluster: both ``ray start`` processes and their trees
        (GCS, dashboard and its modules, raylets, agents, Ray workers, job drivers), and any
        process that carries this cluster's marker but left the trees."""
        found: dict[int, psutil.Process] = {}
        for node in self._nodes:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(node.process.pid)
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
        for proc in marked_processes(lambda value: value == self.marker):
            found.setdefault(proc.pid, proc)
        return list(found.values())

    def memory(self) -> dict[str, dict[str, int]]:
        """Memory of the cluster's processes by process name: ``rss`` (counts shared pages in
        every process) and ``pss`` (shares them out; the sum is what the cluster costs)."""
        total: dict[str, dict[str, int]] = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                info = proc.memory_full_info()
                entry = total.setdefault(proc.name(), {"rss": 0, "pss": 0, "count": 0})
                entry["rss"] += info.rss
                entry["pss"] += getattr(info, "pss", info.uss)
                entry["count"] += 1
        return total

    def stop(self) -> None:
        """SIGTERM both ``ray start --block`` (each stops its node), worker node first; then
        SIGKILL whatever of the cluster is left, and wait until nothing is."""
        procs = self.processes()  # before any exits: the agents are only found in the trees
        for node in reversed(self._nodes):
            if node.process.poll() is None:
                node.process.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        for node in reversed(self._nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in self._nodes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.process.pid, signal.SIGKILL)  # the session each node started
            if node.process.poll() is None:
                node.process.kill()
            node.process.wait()
        left = [proc for proc in procs if proc.is_running()]
        left += [proc for proc in self.processes() if proc.pid not in {p.pid for p in left}]
        left = _kill_all(left)
        self._nodes = []
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        if left:
            raise ClusterError(f"processes of the test Ray cluster survived SIGKILL: "
                               f"{[proc.pid for proc in left]}")

    def __enter__(self) -> TwoNodeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def _client_env(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_shared: dict = {}  # env -> [cluster, users]: one cluster however many modules import the fixture


@pytest.fixture(scope="session")
def two_node_cluster_env() -> dict[str, str]:
    """Extra environment for every process of the session's cluster (Ray workers and job
    drivers on both nodes). Override it, session-scoped in a conftest, e.g. with the S3
    credentials and ``AWS_ENDPOINT_URL`` of a test object store."""
    return {}


@pytest.fixture(scope="session")
def two_node_cluster(two_node_cluster_env):
    """The session's two-node cluster (:class:`TwoNodeCluster`, head 2 CPUs + worker 2 CPUs).

    ``RAY_AUTH_MODE`` (and in token mode the generated ``RAY_AUTH_TOKEN_PATH``) is set in this
    process's environment while it is up, so in-process clients (``JobSubmissionClient``,
    ``ray.util.state``) match the nodes; give subprocess clients
    ``env={**os.environ, **cluster.client_env()}``, which adds ``MEDCURATE_JOBS_ADDRESS``
    (not set here, so other tests keep their defaults)."""
    key = frozenset(two_node_cluster_env.items())
    if key not in _shared:
        _shared[key] = [TwoNodeCluster(env=two_node_cluster_env).start(), 0]
    entry = _shared[key]
    entry[1] += 1
    try:
        with _client_env(entry[0].auth_env):
            yield entry[0]
    finally:
        entry[1] -= 1
        if not entry[1]:
            _shared.pop(key)[0].stop()
