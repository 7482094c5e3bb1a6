"""One token holder must not be able to take the service down: attacks over real HTTP against a
``medcurate serve`` subprocess (a local Ray of its own), plus the tokens file and the Jobs API
auth errors at the command line.

The service of this module declares 64 CPUs per job (``MEDCURATE_JOB_CPUS``), more than any
node here has: Ray queues every job it submits (PENDING, no driver process starts), so 40 real
jobs cost next to nothing on a 2-core machine, and a ``?wait=true`` on each one is a real wait.
Ray gives up on a job queued for ``RAY_JOB_START_TIMEOUT_SECONDS`` (set to 90 s here; 15 min by
default) and fails it, naming the resources it declared: that ends the waits. (A queued job
cannot be stopped sooner: Ray delivers the stop to its driver, which has not started.) Its
quota is 40 jobs.
"""

from __future__ import annotations

import http.server
import os
import secrets
import subprocess
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from live_service import Live
from pydantic import BaseModel

from medcurate.commands import COMMANDS
from medcurate.config import MAX_LIST, SelectConfig
from medcurate.errors import MedcurateError
from medcurate.synthetic import write_embedding_run
from medcurate.workspace import Workspace
from service.jobs import DEFAULT_JOB_CPUS, JobsGateway, QuotaExceeded
from service_process import MEDCURATE, ServiceProcess
from service.settings import Settings, read_tokens

TOKEN = secrets.token_hex(16)
COMMENT = "  # a comment line that is long enough to pass for a token"
QUOTA = 40
JOB_CPUS = 64  # no node has them: every job of this service stays PENDING
SYNC_MAX_ROWS = 500  # "big" (600 rows) selects as a job, "small" (300) in the request
WAITS = 40
QUEUED_S = 90  # RAY_JOB_START_TIMEOUT_SECONDS of the service's Ray


class Guarded(Live):
    """The service of this module, with the job and health views its attacks need."""

    def jobs(self) -> list[dict]:
        response = self.call("GET", "/v1/jobs?page_size=1000")
        assert response.status_code == 200, response.text
        return response.json()["items"]

    def active(self) -> list[str]:
        return [job["job_id"] for job in self.jobs()
                if job["status"] not in ("SUCCEEDED", "FAILED", "STOPPED")]

    def healthy(self) -> float:
        """Seconds /v1/health took (asserting it answered ok)."""
        started = time.monotonic()
        response = self.call("GET", "/v1/health", token=None, timeout=60)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        return time.monotonic() - started


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Guarded:
    root = tmp_path_factory.mktemp("guarded")
    data, workspace = root / "data", root / "ws"
    data.mkdir()
    rng = np.random.default_rng(0)
    ws = Workspace(str(workspace))
    write_embedding_run(ws, "small", rng.normal(size=(300, 8)), [f"c{i % 3}" for i in range(300)])
    write_embedding_run(ws, "big", rng.normal(size=(600, 8)), [f"c{i % 3}" for i in range(600)])
    (data / "zoo.yaml").write_text("models:\n  - name: a\n    model: mobilenetv2-imagenet\n"
                                   "  - name: b\n    model: efficientnet-lite0-imagenet\n")
    tokens = root / "tokens"
    tokens.write_text(f"{COMMENT}\n{TOKEN}\n")
    tokens.chmod(0o600)
    http = requests.Session()
    http.trust_env = False  # no proxy for 127.0.0.1
    env = {"MEDCURATE_MAX_RUNNING_JOBS": str(QUOTA), "MEDCURATE_JOB_CPUS": str(JOB_CPUS),
           "MEDCURATE_SYNC_SELECT_MAX_ROWS": str(SYNC_MAX_ROWS),
           "MEDCURATE_WAIT_TIMEOUT_S": "600", "RAY_JOB_START_TIMEOUT_SECONDS": str(QUEUED_S)}
    with ServiceProcess(workspace, [data], tokens, root / "serve.log", env=env) as process:
        yield Guarded(process.url, process.jobs_address, workspace, data, http, TOKEN)


# -- every size-like parameter is bounded, in one schema for CLI, HTTP and jobs ---------------
SELECT = {"embedding_run": "small--synthetic", "budget_per_class": 2}
OVERSIZED = [
    ("/v1/select", {**SELECT, "strategy": "facility-location", "n_neighbors": 100_000_000},
     "less than or equal to 200"),
    ("/v1/select", {**SELECT, "strategy": "typicality", "n_neighbors": 201},
     "less than or equal to 200"),
    ("/v1/select", {**SELECT, "fit_sample": 10 ** 9}, "less than or equal to 200000"),
    ("/v1/select", {**SELECT, "budget_per_class": 10 ** 9}, "less than or equal to 100000"),
    ("/v1/select", {**SELECT, "min_per_stratum": 10 ** 9}, "less than or equal to 100000"),
    ("/v1/select", {**SELECT, "pca_dims": 10 ** 6}, "less than or equal to 2048"),
    ("/v1/select", {**SELECT, "stratify_by": [f"c{i}" for i in range(33)]}, "at most 32 items"),
    ("/v1/select", {**SELECT, "splits": ",".join(["train"] * 33)}, "at most 32 items"),
    ("/v1/jobs", {"kind": "optidel", "params": {"embedding_run": "small--synthetic",
                                                "fraction": 0.1, "n_clusters": 10 ** 6}},
     "less than or equal to 256"),
    ("/v1/select", {**SELECT, "page_size": 10 ** 6}, "less than or equal to 10000"),
    ("/v1/jobs", {"kind": "compare-selections", "params": {
        "embedding_run": "small--synthetic", "budgets": list(range(1, 40))}}, "at most 32 items"),
    ("/v1/jobs", {"kind": "compare-selections", "params": {
        "embedding_run": "small--synthetic", "budgets": [10, 10 ** 9]}},
     "less than or equal to 100000"),
    ("/v1/jobs", {"kind": "compare-selections", "params": {
        "embedding_run": "small--synthetic", "seeds": list(range(33))}}, "at most 32 items"),
    ("/v1/jobs", {"kind": "audit", "params": {"collection": "small", "confounder": "tag",
                                              "zoo": "/z.yaml", "levels": [0.5] * 33}},
     "at most 32 items"),
    ("/v1/jobs", {"kind": "audit", "params": {"collection": "small", "confounder": "tag",
                                              "zoo": "/z.yaml", "permutations": 10 ** 9}},
     "less than or equal to 100000"),
    ("/v1/jobs", {"kind": "pretrain", "params": {"collection": "small", "epochs": 10 ** 6}},
     "less than or equal to 1000"),
    ("/v1/jobs", {"kind": "pretrain", "params": {"collection": "small", "img_size": 65536,
                                                 "patch_size": 8}},
     "less than or equal to 1024"),
    ("/v1/jobs", {"kind": "finetune", "params": {"train": "small", "model": "x",
                                                 "num_workers": 10_000}},
     "less than or equal to 64"),
    ("/v1/jobs", {"kind": "embed", "params": {"collection": "small", "shard_size": 10 ** 9}},
     "less than or equal to 100000"),
    ("/v1/jobs", {"kind": "curate", "params": {"budget_per_class": 10 ** 9}},
     "less than or equal to 100000"),
    ("/v1/transferability", {"target": "small", "zoo": "/z.yaml", "per_class": 10 ** 9},
     "less than or equal to 10000"),
]


@pytest.mark.parametrize("path, body, bound", OVERSIZED,
                         ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, _, _) in
                              enumerate(OVERSIZED)])
def test_an_oversized_parameter_is_422_naming_its_bound(guarded, path, body, bound):
    started = time.monotonic()
    response = guarded.call("POST", path, json=body)
    assert response.status_code == 422, response.text
    assert bound in response.json()["detail"], response.json()
    assert time.monotonic() - started < 10  # refused before any work
    assert guarded.healthy() < 5


def test_oversized_pages_are_422(guarded):
    for path in ("/v1/collections?page_size=100000", "/v1/jobs?page_size=1000000",
                 "/v1/selections/x?page_size=1000000"):
        response = guarded.call("GET", path)
        assert response.status_code == 422, (path, response.text)
    assert guarded.active() == []  # none of the attacks above became a job


def _upper_bounded(field) -> bool:
    return any(getattr(item, "le", None) is not None or getattr(item, "lt", None) is not None
               for item in field.metadata)


def _max_length(field) -> bool:
    return any(getattr(item, "max_length", None) == MAX_LIST for item in field.metadata)


NOT_SIZES = {"seed", "map_seed"}  # ints that size nothing


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_every_size_like_field_of_every_command_is_bounded(kind):
    """A field added later without a bound fails here: ints and int lists (sizes, counts,
    budgets) need an upper bound, every list at most MAX_LIST items."""
    config: type[BaseModel] = COMMANDS[kind].config
    for name, field in config.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        is_list = typing.get_origin(annotation) is list
        is_int = not is_list and (annotation is int or (int in args and bool not in args))
        if is_int and name not in NOT_SIZES:
            assert _upper_bounded(field), f"{kind}: {name} has no upper bound"
        if is_list:
            assert _max_length(field), f"{kind}: {name} has no length bound"
            item = typing.get_args(annotation)[0]
            if typing.get_origin(item) is typing.Annotated and typing.get_args(item)[0] is int:
                assert name == "budgets"
        if (is_int and name not in NOT_SIZES) or is_list:
            assert "at most" in (field.description or ""), \
                f"{kind}: {name}'s description does not name its bound"


def test_the_cli_shares_the_bounds(tmp_path):
    result = subprocess.run([str(MEDCURATE), "select", "run", "--strategy", "facility-location",
                             "--budget-per-class", "2", "--n-neighbors", "100000000",
                             "--workspace", str(tmp_path / "ws")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "--n-neighbors: Input should be less than or equal to 200" in result.stderr
    assert "Traceback" not in result.stderr


# -- job quota, queued jobs, and waits that hold no thread -------------------------------------
class _RecordingClient:
    """Stands in for Ray's JobSubmissionClient: records what a submission declares."""

    def __init__(self):
        self.submitted: list[dict] = []

    def submit_job(self, **kwargs) -> str:
        self.submitted.append(kwargs)
        return f"raysubmit_{len(self.submitted)}"

    def list_jobs(self) -> list:
        return [SimpleNamespace(metadata=job["metadata"], status="RUNNING", start_time=0)
                for job in self.submitted]


def test_jobs_declare_their_cpus_and_the_gateway_counts_its_own():
    gateway = JobsGateway("http://127.0.0.1:1", job_cpus=0.5)
    gateway._client = client = _RecordingClient()
    config = SelectConfig(embedding_run="x--y", budget_per_class=2)
    gateway.submit("select", config, "/ws")  # the CLI's: no quota
    assert client.submitted[0]["entrypoint_num_cpus"] == 0.5
    for _ in range(2):
        gateway.submit("select", config, "/ws", limit=2)
    gateway.submit("select", config, "/other", limit=2)  # another workspace's service
    with pytest.raises(QuotaExceeded, match="2 jobs") as refused:
        gateway.submit("select", config, "/ws", limit=2, retry_after_s=7)
    assert refused.value.retry_after_s == 7 and len(client.submitted) == 4
    assert JobsGateway("http://127.0.0.1:1").job_cpus == DEFAULT_JOB_CPUS > 0


def test_health_answers_while_40_waits_are_pending_and_the_quota_is_429(guarded):
    """40 ``?wait=true`` requests, each waiting on its own real (queued) job: more than
    max_ongoing_requests was before (32), so the old thread-pinning wait left /v1/health
    queued behind them for the whole wait. Now health and an authenticated read answer at once,
    the 41st job is refused 429 with Retry-After. When Ray gives up on the queued jobs, every
    wait answers 200 with its job, and the quota admits jobs again."""
    assert guarded.active() == []
    body = {"target": "small", "zoo": str(guarded.data / "zoo.yaml"), "per_class": 5}

    def wait() -> requests.Response:
        http = requests.Session()
        http.trust_env = False
        return http.post(f"{guarded.url}/v1/transferability?wait=true", json=body,
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=400)

    pool = ThreadPoolExecutor(WAITS)
    try:
        waits = [pool.submit(wait) for _ in range(WAITS)]
        deadline = time.monotonic() + 240
        while len(active := guarded.active()) < WAITS and time.monotonic() < deadline:
            assert not any(w.done() for w in waits), [w.result().text for w in waits
                                                       if w.done()][:3]
            time.sleep(1)
        assert len(active) == WAITS, f"{len(active)} of {WAITS} jobs submitted"
        submitted_s = time.monotonic() - deadline + 240
        time.sleep(2)  # every request is now in its polling loop
        assert not any(w.done() for w in waits)

        latencies = [guarded.healthy() for _ in range(5)]
        started = time.monotonic()
        assert guarded.call("GET", "/v1/collections", timeout=60).status_code == 200
        read_s = time.monotonic() - started
        print(f"health while {WAITS} waits pend: max {max(latencies):.3f} s; "
              f"authenticated read {read_s:.3f} s")
        assert max(latencies) < 5 and read_s < 10

        # Ray queues the jobs: they declare more CPUs than any node has free, so none started.
        jobs = {job["job_id"]: job for job in guarded.jobs()}
        assert {jobs[job_id]["status"] for job_id in active} == {"PENDING"}
        print(f"a queued job's message: {jobs[active[0]]['message']}")

        # The quota: every route that submits a job answers 429 with Retry-After.
        for path, payload in [
                ("/v1/jobs", {"kind": "select", "params": {
                    "embedding_run": "small--synthetic", "budget_per_class": 2}}),
                ("/v1/transferability", body),
                ("/v1/select", {"embedding_run": "big--synthetic", "budget_per_class": 2})]:
            refused = guarded.call("POST", path, json=payload)
            assert refused.status_code == 429, (path, refused.text)
            assert int(refused.headers["Retry-After"]) > 0
            assert "40 jobs" in refused.json()["detail"]
        # ... while a selection in the request (no job) still runs.
        small = guarded.call("POST", "/v1/select", json={**SELECT, "strategy": "random"})
        assert small.status_code == 201, small.text
        assert len(guarded.active()) == WAITS  # nothing over the quota was submitted

        assert not any(w.done() for w in waits)
        answers = [w.result(timeout=QUEUED_S + 120) for w in waits]
        assert {a.status_code for a in answers} == {200}, [a.text for a in answers][:3]
        assert {a.json()["status"] for a in answers} == {"FAILED"}
        assert all("entrypoint_num_cpus" in a.json()["message"] for a in answers)
        assert sorted(a.json()["job_id"] for a in answers) == sorted(active)
        print(f"{WAITS} jobs submitted in {submitted_s:.1f} s")
    finally:
        for job_id in guarded.active():
            guarded.call("DELETE", f"/v1/jobs/{job_id}")
        pool.shutdown(wait=False, cancel_futures=True)

    # Under the quota again: accepted.
    again = guarded.call("POST", "/v1/jobs", json={"kind": "select", "params": {
        "embedding_run": "small--synthetic", "budget_per_class": 2}})
    assert again.status_code == 202, again.text
    guarded.call("DELETE", f"/v1/jobs/{again.json()['job_id']}")


# -- messages say what was refused, not what exists -----------------------------------------
def test_not_found_names_no_other_artefact(guarded):
    made = guarded.call("POST", "/v1/select", json={**SELECT, "strategy": "random",
                                                    "selection_id": "secret-selection"})
    assert made.status_code in (201, 409), made.text
    workspace = str(guarded.workspace)
    cases = [("GET", "/v1/embeddings/nope", None, "no embedding named 'nope'"),
             ("GET", "/v1/collections/nope", None, "no collection named 'nope'"),
             ("GET", "/v1/selections/nope", None, "no selection named 'nope'"),
             ("GET", "/v1/selections/nope/manifest", None, "no selection named 'nope'"),
             ("GET", "/v1/selections/nope/report", None, "no selection named 'nope'"),
             ("POST", "/v1/select", {"embedding_run": "nope", "budget_per_class": 2},
              "no embedding named 'nope'")]
    for method, path, body, message in cases:
        response = guarded.call(method, path, json=body)
        assert response.status_code == 404, (path, response.text)
        detail = response.json()["detail"]
        assert detail == message, (path, detail)
        for secret in ("small", "big", "secret-selection", "known", workspace):
            assert secret not in response.text, (path, response.text)
    again = guarded.call("POST", "/v1/select", json={**SELECT, "strategy": "random",
                                                     "selection_id": "secret-selection"})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    assert workspace not in again.text


# -- the tokens file ------------------------------------------------------------------------
def test_a_comment_line_with_leading_blanks_is_not_a_token(guarded, tmp_path):
    comment = COMMENT.strip()
    assert guarded.call("GET", "/v1/collections", token=comment).status_code == 401
    assert guarded.call("GET", "/v1/collections", token=COMMENT).status_code == 401
    assert guarded.call("GET", "/v1/collections").status_code == 200
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{COMMENT}\n\t# tabbed comment that is long enough\n  {TOKEN}  \n\n")
    tokens.chmod(0o600)
    assert read_tokens(str(tokens)) == [TOKEN]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_tokens_file_others_may_access_is_refused(tmp_path, mode):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(mode)
    with pytest.raises(MedcurateError, match=f"mode {mode:04o}.*chmod 600"):
        Settings.load({"tokens_file": str(tokens)})
    tokens.chmod(0o400)  # owner-only, read-only: fine
    assert [t.get_secret_value() for t in Settings.load({"tokens_file": str(tokens)}).tokens] \
        == [TOKEN]


def test_serve_refuses_a_world_readable_tokens_file_before_starting(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(0o644)
    result = subprocess.run([str(MEDCURATE), "serve", "--tokens-file", str(tokens),
                             "--workspace", str(tmp_path / "ws"), "--port", "1"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "chmod 600" in result.stderr and "Traceback" not in result.stderr


# -- the Jobs API behind token auth ---------------------------------------------------------
class _AuthRefusing(http.server.BaseHTTPRequestHandler):
    """A Ray dashboard with token auth, as a client without the token sees it."""

    status = 401

    def do_GET(self):  # noqa: N802 - http.server's name
        body = (b"Unauthorized: Missing authentication token" if self.status == 401
                else b"Forbidden: Invalid authentication token")
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, message", [(401, "requires a Ray auth token"),
                                             (403, "refused the Ray auth token")])
def test_jobs_behind_token_auth_fail_with_a_clear_message(status, message):
    handler = type("Handler", (_AuthRefusing,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MEDCURATE_", "RAY_"))}
    env.update(RAY_AUTH_MODE="disabled", NO_PROXY="127.0.0.1")
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        for args in (["jobs", "list"], ["jobs", "status", "raysubmit_x"],
                     ["submit", "select", "--param", "embedding_run=x",
                      "--param", "budget_per_class=2"]):
            result = subprocess.run([str(MEDCURATE), *args, "--address", address],
                                    capture_output=True, text=True, timeout=120, check=False,
                                    env=env)
            assert result.returncode == 2, (args, result.stderr)
            assert "Traceback" not in result.stderr, result.stderr
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("error: ") and message in last and "RAY_AUTH" in last, last
    finally:
        server.shutdown()
