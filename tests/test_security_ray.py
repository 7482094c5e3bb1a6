"""The local Ray head of ``medcurate serve`` refuses every caller without its token.

One ``medcurate serve`` (``tests/service_process.py``) with the secure default, started
with ``RAY_AUTH_MODE=disabled`` and a stray ``RAY_AUTH_TOKEN`` in its environment (as ``make``
exports the first): both must be ignored. Every TCP socket that its process tree (the service,
its ``ray start`` head in a session of its own, the GCS, raylet, dashboard, agents, Serve's
proxy, controller and replica) listens on is found with psutil and probed without the token,
on the address it is bound to or, when bound to every interface, on the machine's routable
addresses: an HTTP endpoint must answer 401/403 (the Ray dashboard, the dashboard agent whose
job endpoint runs commands, the runtime-env agent), a gRPC endpoint UNAUTHENTICATED (GCS,
raylet, object manager, every core worker, the agent, the Ray client server, Serve's replica
ingress). The exceptions are named and checked for what they are: the service's own HTTP API
(health open, the rest behind its bearer token) and Ray's read-only Prometheus exporters. With
the token the same calls pass, and jobs run; the ``--insecure-no-ray-auth`` opt-in shows the
probes would see an open head.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from medcurate.synthetic import write_embedding_run
from medcurate.workspace import Workspace
from service.local_ray import INSECURE_WARNING
from service_process import MEDCURATE, ServiceProcess

API_TOKEN = "f" * 8 + os.urandom(12).hex()
STRAY_TOKEN = os.urandom(32).hex()  # a RAY_AUTH_TOKEN the service inherits and must not use
# gRPC methods, one of which each Ray gRPC server has; auth is checked once the method is found
GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",  # GCS
    "/ray.rpc.NodeManagerService/GetNodeStats",  # raylet
    "/ray.rpc.ObjectManagerService/Pull",  # raylet's object manager
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",  # every driver and worker
    "/ray.rpc.ReporterService/HealthCheck",  # dashboard agent
    "/ray.rpc.RayletDriver/ClusterInfo",  # Ray client server
    "/ray.serve.ASGIService/HandleRequest",  # Serve replica ingress
)
GRPC_OPEN = {"/grpc.health.v1.Health/Check"}  # answers without a token: health only
METRICS_OWNERS = ("monitor.py", "dashboard.py", "ray::DashboardAgent")  # Prometheus exporters


def _http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy
    return session


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    workspace = root / "ws"
    write_embedding_run(Workspace(str(workspace)), "syn", np.random.default_rng(0).normal(
        size=(60, 8)), [f"c{i % 3}" for i in range(60)])
    tokens = root / "tokens"
    tokens.write_text(f"{API_TOKEN}\n")
    tokens.chmod(0o600)
    with ServiceProcess(workspace, [root], tokens, root / "serve.log", env={
            "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": STRAY_TOKEN}) as process:
        time.sleep(3)  # the agents' last ports
        yield process


def _processes(process: ServiceProcess) -> list[psutil.Process]:
    """The service's process tree, and any process naming its Ray temp dir that left it."""
    root = psutil.Process(process.process.pid)
    found = {proc.pid: proc for proc in [root, *root.children(recursive=True)]}
    for proc in psutil.process_iter():
        try:
            if str(process.ray_dir) in " ".join(proc.cmdline()):
                found.setdefault(proc.pid, proc)
        except psutil.Error:
            continue
    return list(found.values())


def _label(proc: psutil.Process) -> str:
    cmdline = proc.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    script = next((Path(part).name for part in cmdline[1:] if part.endswith(".py")), None)
    return script or (" ".join(cmdline[1:3]) if proc.name().startswith("python") else
                      proc.name())


def _routable_addresses() -> list[str]:
    return sorted({addr.address for addrs in psutil.net_if_addrs().values() for addr in addrs
                   if addr.family == socket.AF_INET and not addr.address.startswith("127.")})


def _listening(process: ServiceProcess) -> list[tuple[str, int, str]]:
    """(address to probe, port, owner) for every LISTEN socket of the service's processes."""
    sockets = set()
    for proc in _processes(process):
        try:
            connections = proc.net_connections("inet")
            label = _label(proc)
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status != psutil.CONN_LISTEN:
                continue
            ip = conn.laddr.ip.removeprefix("::ffff:")
            for host in (["127.0.0.1", *_routable_addresses()] if ip in ("0.0.0.0", "::")
                         else [ip]):
                sockets.add((host, conn.laddr.port, f"{label} ({conn.laddr.ip or '*'})"))
    return sorted(sockets, key=lambda s: (s[1], s[0]))


def _speaks_http(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.settimeout(5)
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        try:
            return conn.recv(5) == b"HTTP/"
        except OSError:
            return False


def _grpc_codes(host: str, port: int, token: str | None) -> dict[str, str]:
    import grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    codes = {}
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in (*GRPC_METHODS, *GRPC_OPEN):
            call = channel.unary_unary(method, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            try:
                call(b"", timeout=10, metadata=metadata)
                codes[method] = "OK"
            except grpc.RpcError as exc:
                codes[method] = exc.code().name
    return codes


def _probe(process: ServiceProcess, host: str, port: int, owner: str, token: str) -> str:
    """What the endpoint answers without the token; fails on one that lets such a caller in."""
    where = f"{owner} on {host}:{port}"
    if not _speaks_http(host, port):
        bare = _grpc_codes(host, port, None)
        guarded = [m for m, code in bare.items() if code == "UNAUTHENTICATED"]
        allowed = [m for m, code in bare.items() if code != "UNIMPLEMENTED"
                   and m not in guarded]
        assert guarded, f"{where}: no known gRPC method refused without the token: {bare}"
        assert set(allowed) <= GRPC_OPEN, f"{where}: gRPC calls without the token: {allowed}"
        with_token = _grpc_codes(host, port, token)
        assert all(with_token[m] != "UNAUTHENTICATED" for m in guarded), (where, with_token)
        return f"gRPC: {', '.join(m.split('/', 1)[1] for m in guarded)} UNAUTHENTICATED"
    http = _http()
    base = f"http://{host}:{port}"
    if port == process.port:  # the service's own HTTP API: its bearer token, not Ray's
        assert http.get(f"{base}/v1/health", timeout=10).status_code == 200
        assert http.get(f"{base}/v1/collections", timeout=10).status_code == 401
        return "medcurate HTTP API: /v1/health 200, /v1/collections 401 (bearer token)"
    bare = http.get(f"{base}/api/jobs/", timeout=10)
    if bare.status_code in (401, 403):
        posted = http.post(f"{base}/api/job_agent/jobs/", json={"entrypoint": "id"}, timeout=10)
        assert posted.status_code in (401, 403), (where, posted.status_code, posted.text)
        authed = http.get(f"{base}/api/jobs/", timeout=10,
                          headers={"Authorization": f"Bearer {token}"})
        assert authed.status_code not in (401, 403), (where, authed.status_code)
        return (f"HTTP {bare.status_code} ({bare.text.strip()[:40]}); with the token "
                f"{authed.status_code}")
    # Ray's Prometheus exporters (autoscaler, dashboard, agent): read-only metrics, no token
    assert owner.startswith(METRICS_OWNERS), f"{where}: HTTP {bare.status_code} without token"
    assert bare.status_code == 200 and bare.text.startswith("# HELP"), (where, bare.text[:200])
    posted = http.post(f"{base}/api/job_agent/jobs/", json={"entrypoint": "id"}, timeout=10)
    assert posted.status_code >= 400, (where, posted.status_code)
    return "Prometheus metrics, read-only (GET 200, POST refused)"


def test_the_head_uses_a_fresh_private_token_whatever_the_environment_says(secure):
    assert secure.ray_auth_env["RAY_AUTH_MODE"] == "token"
    token_path = Path(secure.ray_auth_env["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert token_path.parent == secure.ray_dir and (secure.ray_dir / "ray").is_dir()
    assert stat.S_IMODE(secure.ray_dir.stat().st_mode) == 0o700  # Ray's ray/ in it is 0777
    token = token_path.read_text().strip()
    assert len(token) >= 32 and token != STRAY_TOKEN
    log = secure.log.read_text()
    assert "RAY_AUTH_MODE=disabled is ignored" in log and INSECURE_WARNING not in log


def test_every_listening_socket_refuses_a_caller_without_the_token(secure):
    token = Path(secure.ray_auth_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    endpoints = _listening(secure)
    owners = {owner.rsplit(" (", 1)[0] for _, _, owner in endpoints}
    for expected in ("gcs_server", "raylet", "dashboard.py", "ray::DashboardAgent",
                     "ray::RuntimeEnvAgent", "ray::ProxyActor", "ray::ServeController"):
        assert expected in owners, f"no listening socket of {expected}: {sorted(owners)}"
    assert any(host not in ("127.0.0.1",) for host, _, _ in endpoints), \
        "nothing reachable off loopback: the probes would prove nothing"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda e: _probe(secure, *e, token), endpoints))
    table = "\n".join(f"{owner:52} {host}:{port:<6} {answer}"
                      for (host, port, owner), answer in zip(endpoints, answers))
    print(f"\n{len(endpoints)} listening endpoints:\n{table}")
    assert any("UNAUTHENTICATED" in a for a in answers) and any("HTTP 401" in a for a in answers)


def _client(code: str, env: dict[str, str], timeout_s: float = 120) -> str:
    """``code`` in a fresh interpreter, with no default token (HOME is empty); its output."""
    home = Path(env.pop("HOME"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=timeout_s, cwd=home, check=False, env={
                                **{k: v for k, v in os.environ.items()
                                   if not k.startswith(("RAY_", "MEDCURATE_"))},
                                "HOME": str(home), **env})
    return result.stdout + result.stderr


INIT = """
import logging, sys, ray
handler = logging.StreamHandler(sys.stdout)  # the Ray client logs why it could not connect
client_log = logging.getLogger("ray.util.client.worker")
client_log.setLevel(logging.DEBUG)
client_log.addHandler(handler)
try:
    ray.init(address={address!r}, logging_level=logging.ERROR)
    print("CONNECTED", ray.cluster_resources())
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
"""
AUTH_REFUSALS = ("Unauthenticated", "AuthenticationError", "authentication token",
                 "Unauthorized", "Forbidden")
SUBMIT = """
from ray.job_submission import JobSubmissionClient
try:
    print("SUBMITTED", JobSubmissionClient({address!r}).submit_job(entrypoint="id"))
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


def test_ray_clients_without_the_token_are_refused(secure, tmp_path):
    head_ip = next(iter(_routable_addresses()), "127.0.0.1")
    gcs_port = int(next(arg.split("=")[1] for proc in _processes(secure)
                        for arg in _cmdline(proc) if arg.startswith("--gcs_server_port=")))
    client_port = int(next(arg.split("=")[1] for proc in _processes(secure)
                           for arg in _cmdline(proc) if arg.startswith("--port=")
                           and "ray.util.client.server" in _cmdline(proc)))
    wrong = os.urandom(32).hex()
    cases = {
        "ray.init(GCS), auth off": (INIT.format(address=f"{head_ip}:{gcs_port}"),
                                    {"RAY_AUTH_MODE": "disabled"}),
        "ray.init(GCS), token mode, no token": (INIT.format(address=f"{head_ip}:{gcs_port}"),
                                                {"RAY_AUTH_MODE": "token"}),
        "ray.init(GCS), wrong token": (INIT.format(address=f"{head_ip}:{gcs_port}"),
                                       {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": wrong}),
        "Ray client ray://, auth off": (INIT.format(address=f"ray://{head_ip}:{client_port}"),
                                        {"RAY_AUTH_MODE": "disabled"}),
        "job submission, auth off": (SUBMIT.format(address=secure.jobs_address),
                                     {"RAY_AUTH_MODE": "disabled"}),
        "job submission, wrong token": (SUBMIT.format(address=secure.jobs_address),
                                        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": wrong}),
    }
    quick = {"RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1",  # 3 tries, not 35 s of them
             "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "2", "HOME": str(tmp_path)}
    with ThreadPoolExecutor(len(cases)) as pool:
        outputs = dict(zip(cases, pool.map(
            lambda case: _client(case[0], {**case[1], **quick}), cases.values())))
    for name, output in outputs.items():
        assert "REFUSED" in output and "CONNECTED" not in output and "SUBMITTED" not in output, \
            f"{name}:\n{output[-2000:]}"
        # refused for the token, not for being slow or unreachable
        assert any(why in output for why in AUTH_REFUSALS), f"{name}:\n{output[-2000:]}"
    cli = subprocess.run([str(MEDCURATE), "jobs", "list"], capture_output=True, text=True,
                         timeout=120, check=False, env={
                             **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                             "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path),
                             "MEDCURATE_JOBS_ADDRESS": secure.jobs_address})
    assert cli.returncode != 0, cli.stdout


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_with_the_token_jobs_run_and_their_drivers_join_the_cluster(secure, tmp_path):
    """A job's driver calling ray.init() gets the token from the head (its runtime_env carries
    only RAY_AUTH_MODE, as the service's JobsGateway passes it)."""
    code = """
import time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient({address!r})
job = client.submit_job(
    entrypoint="python -c 'import ray; ray.init(); print(\\"nodes\\", len(ray.nodes()))'",
    runtime_env={{"env_vars": {{"RAY_AUTH_MODE": "token"}}}})
for _ in range(240):
    status = str(client.get_job_status(job))
    if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
        break
    time.sleep(0.5)
print("STATUS", status)
print(client.get_job_logs(job))
""".format(address=secure.jobs_address)
    output = _client(code, {**secure.ray_auth_env, "HOME": str(tmp_path)}, timeout_s=180)
    assert "STATUS SUCCEEDED" in output and "nodes 1" in output, output[-3000:]
    cli = subprocess.run([str(MEDCURATE), "jobs", "list"], capture_output=True, text=True,
                         timeout=120, check=False, env={**os.environ, **secure.client_env()})
    assert cli.returncode == 0, cli.stderr


def test_the_http_api_keeps_its_bearer_token_and_submits_jobs_with_the_ray_token(secure):
    http = _http()
    assert http.get(f"{secure.url}/v1/health", timeout=10).json()["status"] == "ok"
    assert http.get(f"{secure.url}/v1/jobs", timeout=10).status_code == 401
    bearer = {"Authorization": f"Bearer {API_TOKEN}"}
    submitted = http.post(f"{secure.url}/v1/jobs", headers=bearer, timeout=60, json={
        "kind": "select", "params": {"embedding_run": "syn--synthetic", "strategy": "random",
                                     "budget_per_class": 2}})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        view = http.get(f"{secure.url}/v1/jobs/{job_id}", headers=bearer, timeout=30).json()
        if view["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    assert view["status"] == "SUCCEEDED", json.dumps(view)[:2000]
    assert view["result"]["selected"] == 6


OPEN_HEAD = """
import json, urllib.request
from service.local_ray import free_port, start_local_head
head = start_local_head(free_port(), token_auth=False)
try:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    with opener.open(head.dashboard + "/api/jobs/", timeout=30) as answer:
        print("OPEN", answer.status, json.dumps(head.auth_env))
finally:
    head.stop()
"""


def test_the_insecure_opt_in_is_explicit_and_warned_about(tmp_path):
    """``--insecure-no-ray-auth`` (never RAY_AUTH_MODE alone) turns the token off, with a
    warning first; then the Jobs API answers anyone, as the probes above would notice."""
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(MEDCURATE), "serve", *args], capture_output=True, text=True,
                              timeout=120, check=False, cwd=tmp_path,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})

    refused = serve("--insecure-no-ray-auth", "--ray-address", "127.0.0.1:1")
    assert refused.returncode == 2 and "for the local Ray only" in refused.stderr
    # the warning comes before anything else is checked (here: a tokens file that is absent)
    warned = serve("--insecure-no-ray-auth", "--tokens-file", str(tmp_path / "absent"))
    assert warned.returncode == 2 and INSECURE_WARNING in warned.stderr, warned.stderr
    quiet = serve("--tokens-file", str(tmp_path / "absent"))
    assert quiet.returncode == 2 and INSECURE_WARNING not in quiet.stderr
    assert "RAY_AUTH_MODE=disabled is ignored" in quiet.stderr
    output = _client(OPEN_HEAD.format(), {"HOME": str(tmp_path),
                                          "PYTHONPATH": str(Path(__file__).parent.parent)},
                     timeout_s=180)
    assert 'OPEN 200 {"RAY_AUTH_MODE": "disabled"}' in output, output[-3000:]
