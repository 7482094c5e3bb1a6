"""The HTTP service over real HTTP: one ``medcurate serve`` subprocess for the module, with a
local Ray of its own (dashboard and Jobs API on free ports, apart from any Ray of the test
session), serving a temporary workspace that holds synthetic embedding runs; the BreastMNIST
flow (ingest and embed as jobs, select, manifest, transferability) runs where ../shared/data
is present."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import requests
from conftest import SHARED_DATA
from live_service import Live

from medcurate.config import (
    CurateConfig,
    EmbedConfig,
    IngestConfig,
    ScoreConfig,
    SelectConfig,
)
from medcurate.errors import AlreadyExists, MedcurateError
from medcurate.synthetic import write_embedding_run
from medcurate.workspace import PROVENANCE_FILE, Workspace
from service.paths import PathPolicy, PathRefused, location_fields
from service_process import MEDCURATE, ServiceProcess
from service.settings import Settings

TOKEN = secrets.token_hex(16)
SYN_RUN = "syn--synthetic"  # 1,200 points, 3 classes, 32-d: selections in well under a second
BIG_RUN = "big--synthetic"  # 30,000 points: over the limit below, so selections are jobs
SYNC_MAX_ROWS = 10_000
BREAST = SHARED_DATA / "breastmnist"


def _synthetic_runs(workspace: Workspace) -> None:
    rng = np.random.default_rng(0)
    labels = [f"class{i % 3}" for i in range(1200)]
    sites = ["site_b" if i % 10 == 0 else "site_a" for i in range(1200)]
    write_embedding_run(workspace, "syn", rng.normal(size=(1200, 32)), labels, {"site": sites},
                        shard_size=500)
    write_embedding_run(workspace, "big", rng.normal(size=(30_000, 16)),
                        [f"class{i % 3}" for i in range(30_000)])


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    root = tmp_path_factory.mktemp("service")
    data, workspace = root / "data", root / "ws"
    data.mkdir()
    _synthetic_runs(Workspace(str(workspace)))
    tokens = root / "tokens"
    tokens.write_text(f"# test tokens\n{TOKEN}\n")
    tokens.chmod(0o600)  # the service refuses a tokens file others may read
    roots = [data] + ([BREAST] if BREAST.is_dir() else [])
    http = requests.Session()
    http.trust_env = False  # no proxy for 127.0.0.1
    with ServiceProcess(workspace, roots, tokens, root / "serve.log",
                        env={"MEDCURATE_SYNC_SELECT_MAX_ROWS": str(SYNC_MAX_ROWS)}) as process:
        yield Live(process.url, process.jobs_address, workspace, data, http, TOKEN)


# -- auth and bad input ---------------------------------------------------------------------
def test_health_is_open_and_the_rest_needs_the_token(live):
    assert live.call("GET", "/v1/health", token=None).json()["status"] == "ok"
    for path in ("/v1/collections", "/v1/embeddings", "/v1/selections/x", "/v1/jobs"):
        for token in (None, "x" * 32, TOKEN[:-1] + ("0" if TOKEN[-1] != "0" else "1")):
            response = live.call("GET", path, token=token)
            assert response.status_code == 401, (path, token, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert live.call("GET", "/v1/collections").status_code == 200
    basic = live.http.get(f"{live.url}/v1/collections", headers={"Authorization": TOKEN})
    assert basic.status_code == 401


def test_paths_outside_the_data_roots_are_refused(live):
    (live.data / "escape").symlink_to("/etc")
    zoo = live.data / "zoo-outside.yaml"
    zoo.write_text("models:\n  - name: a\n    model: mobilenetv2-imagenet\n"
                   "  - name: b\n    model: mobilenetv2-imagenet\n    weights: /etc/hostname\n")
    before = live.call("GET", "/v1/jobs").json()["total"]
    refused = {
        403: [("ingest", {"source": str(live.data / ".." / ".." / "etc"), "name": "x"}),
              ("ingest", {"source": "/etc", "name": "x"}),
              ("ingest", {"source": str(live.data / "escape" / "hostname"), "name": "x"}),
              ("ingest", {"source": "s3://bucket/archive", "name": "x"}),
              ("ingest", {"source": str(live.data), "name": "x", "metadata": "/etc/hostname"}),
              ("embed", {"collection": "syn", "model": "mae:/etc/model.pt"}),
              ("score", {"target": "syn", "zoo": str(zoo)})],
        422: [("ingest", {"source": "../data", "name": "x"}),
              ("ingest", {"source": "data", "name": "x"})],
    }
    for status, cases in refused.items():
        for kind, params in cases:
            response = live.call("POST", "/v1/jobs", json={"kind": kind, "params": params})
            assert response.status_code == status, (params, response.text)
            assert "data root" in response.json()["detail"]
    response = live.call("POST", "/v1/transferability", json={"target": "syn", "zoo": "/etc/x"})
    assert response.status_code == 403
    assert live.call("GET", "/v1/jobs").json()["total"] == before  # nothing was submitted


@pytest.mark.parametrize("path, body", [
    ("/v1/jobs", {"kind": "select", "params": {"embedding_run": SYN_RUN,
                                               "budget_per_class": "many"}}),
    ("/v1/jobs", {"kind": "select", "params": {"embedding_run": SYN_RUN, "budget_per_class": 2,
                                               "bogus": 1}}),
    ("/v1/jobs", {"kind": "select", "params": {"embedding_run": "../x", "budget_per_class": 2}}),
    ("/v1/jobs", {"kind": "no-such-kind", "params": {}}),
    ("/v1/jobs", {"kind": "select", "params": [1, 2]}),
    ("/v1/jobs", {"params": {}}),
    ("/v1/jobs", [1, 2]),
    ("/v1/select", {"embedding_run": SYN_RUN, "budget_per_class": 0}),
    ("/v1/select", {"embedding_run": SYN_RUN, "budget_per_class": 2, "strategy": "best"}),
    ("/v1/select", {"embedding_run": SYN_RUN, "budget_per_class": 2, "unknown": True}),
    ("/v1/select", {"embedding_run": SYN_RUN, "budget_per_class": 2, "page_size": 10 ** 6}),
    ("/v1/select", {"embedding_run": SYN_RUN, "budget_per_class": 2, "strategy": "random",
                    "n_neighbors": 5}),
    ("/v1/transferability", {"target": "syn"}),
])
def test_malformed_bodies_are_422_with_a_message(live, path, body):
    response = live.call("POST", path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] and "Traceback" not in response.text


def test_not_json_and_unknown_things(live):
    response = live.call("POST", "/v1/select", data=b'{"embedding_run": ',
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert live.call("GET", "/v1/collections/nope").status_code == 404
    assert live.call("GET", "/v1/selections/nope").status_code == 404
    assert live.call("GET", "/v1/jobs/raysubmit_nope").status_code == 404
    assert live.call("GET", "/v1/jobs/..%2F..%2Fversion").status_code == 404
    assert live.call("POST", "/v1/select", json={"embedding_run": "nope",
                                                 "budget_per_class": 2}).status_code == 404
    assert live.call("GET", "/v1/collections?page_size=100000").status_code == 422


def test_oversized_bodies_are_413(live):
    big = {"embedding_run": SYN_RUN, "budget_per_class": 2, "pad": "x" * (2 << 20)}
    assert live.call("POST", "/v1/select", json=big).status_code == 413
    chunks = (b"x" * 65536 for _ in range(40))  # chunked: no Content-Length to go by
    response = live.call("POST", "/v1/select", data=chunks,
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 413


# -- selections -----------------------------------------------------------------------------
def _read_back(live: Live, selection_id: str) -> dict:
    """Every page of ids, the manifest (Parquet and CSV) and the report agree with the file."""
    first = live.call("GET", f"/v1/selections/{selection_id}?page_size=7")
    assert first.status_code == 200, first.text
    body = first.json()
    ids = []
    for page in range(1, -(-body["ids"]["total"] // 7) + 1):
        ids += live.call("GET", f"/v1/selections/{selection_id}?page={page}&page_size=7"
                         ).json()["ids"]["items"]
    on_disk = pq.read_table(Workspace(str(live.workspace)).path("selections", selection_id,
                                                                "selection.parquet"))
    parquet = live.call("GET", f"/v1/selections/{selection_id}/manifest")
    assert parquet.status_code == 200
    assert pq.read_table(io.BytesIO(parquet.content)).equals(on_disk)
    csv = live.call("GET", f"/v1/selections/{selection_id}/manifest?format=csv")
    assert pacsv.read_csv(io.BytesIO(csv.content)).column("id").to_pylist() == ids
    assert ids == on_disk.column("id").to_pylist()
    assert len(ids) == body["selected"] == sum(c["selected"] for c in body["classes"].values())
    report = live.report(selection_id)
    assert report.status_code == 200 and "<html" in report.text.lower()
    policy = report.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    return body


def test_select_in_the_request_then_read_it_back(live):
    body = {"embedding_run": SYN_RUN, "budget_per_class": 12, "strategy": "stratified",
            "stratify_by": ["site"], "seed": 5, "page_size": 10}
    response = live.call("POST", "/v1/select", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["Location"] == f"/v1/selections/{created['selection_id']}"
    assert created["selected"] == 36 and len(created["ids"]["items"]) == 10
    assert created["ids"]["total"] == 36
    assert _read_back(live, created["selection_id"])["metadata"]["site"]
    again = live.call("POST", "/v1/select", json=body)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    listed = live.call("GET", "/v1/selections").json()["items"]
    assert created["selection_id"] in [item["id"] for item in listed]


def test_a_large_run_selects_as_a_job(live):
    """Over ``sync_select_max_rows`` rows the selection is submitted as a job: 202, then the
    job's result links the selection."""
    response = live.call("POST", "/v1/select", json={
        "embedding_run": BIG_RUN, "budget_per_class": 4, "strategy": "random", "seed": 11})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    view = live.wait_job(job_id, timeout_s=180)
    assert view["status"] == "SUCCEEDED", view
    assert view["artefact"]["kind"] == "selections"
    _read_back(live, view["artefact"]["id"])
    assert "running select" in live.call("GET", f"/v1/jobs/{job_id}/logs").text
    assert job_id in [job["job_id"] for job in live.call("GET", "/v1/jobs").json()["items"]]


def test_bounded_concurrent_load(live):
    """8 clients x 50 requests: reads, and selections with repeated seeds (one id written by
    several requests at once: 201 or 409) and distinct ids. No 5xx; every selection complete."""
    base = {"embedding_run": SYN_RUN, "budget_per_class": 5, "strategy": "stratified"}

    def client(worker: int) -> list[tuple[str, int]]:
        http = requests.Session()
        http.trust_env = False
        headers = {"Authorization": f"Bearer {TOKEN}"}
        seen = []
        for i in range(50):
            if i % 4 == 0:
                body = {**base, "seed": 100 + (i // 4) % 4}  # same ids across the clients
                if i % 20 == 0:
                    body["selection_id"] = f"load-{worker}-{i}"  # distinct ids
                response = http.post(f"{live.url}/v1/select", json=body, headers=headers,
                                     timeout=120)
            elif i % 4 == 1:
                response = http.get(f"{live.url}/v1/collections", headers=headers, timeout=60)
            else:
                selection = f"load-{worker}-0" if i % 4 == 2 else "nope"
                response = http.get(f"{live.url}/v1/selections/{selection}", headers=headers,
                                    timeout=60)
            seen.append((response.request.method, response.status_code))
        return seen

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = [item for items in pool.map(client, range(8)) for item in items]
    elapsed = time.monotonic() - started
    assert len(results) == 400
    assert not [r for r in results if r[1] >= 500], results
    assert {status for method, status in results if method == "POST"} <= {201, 409}
    assert {status for method, status in results if method == "GET"} <= {200, 404}
    selections = live.call("GET", "/v1/selections?page_size=1000").json()["items"]
    made = [item["id"] for item in selections if item["id"].startswith(("load-", "syn-"))]
    assert len([m for m in made if m.startswith("load-")]) == 8 * 3
    for selection_id in made:
        _read_back(live, selection_id)
    print(f"400 requests in {elapsed:.1f} s")


# -- jobs -----------------------------------------------------------------------------------
def test_delete_stops_a_running_job(live):
    job_id = live.job("select", {"embedding_run": BIG_RUN, "budget_per_class": 50,
                                 "selection_id": "to-stop"})
    live.wait_job(job_id, timeout_s=120, until=("RUNNING", "SUCCEEDED", "FAILED"))
    stopped = live.call("DELETE", f"/v1/jobs/{job_id}")
    assert stopped.status_code == 200 and stopped.json()["stopped"] is True, stopped.text
    assert live.wait_job(job_id, timeout_s=120)["status"] == "STOPPED"
    assert not Workspace(str(live.workspace)).exists("selections", "to-stop")


def test_cli_submit_and_jobs(live):
    env = {**os.environ, "MEDCURATE_JOBS_ADDRESS": live.jobs_address}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(MEDCURATE), *args], capture_output=True, text=True, env=env,
                              timeout=120, check=False)

    bad = cli("submit", "select", "--param", "embedding_run=x", "--param", "budget_per_class=0")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")
    assert "--budget-per-class" in bad.stderr and bad.stdout == ""
    submitted = cli("submit", "select", "--params-json", json.dumps(
        {"embedding_run": SYN_RUN, "strategy": "random"}), "--param", "budget_per_class=3",
        "--workspace", str(live.workspace))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert live.wait_job(job_id, timeout_s=180)["status"] == "SUCCEEDED"
    status = json.loads(cli("jobs", "status", job_id).stdout)
    assert status["status"] == "SUCCEEDED" and status["result"]["selected"] == 9
    assert job_id in cli("jobs", "list").stdout
    assert "running select" in cli("jobs", "logs", job_id).stdout
    assert cli("jobs", "stop", job_id).stdout.strip() == "not running"
    missing = cli("jobs", "status", "raysubmit_nope")
    assert missing.returncode == 2 and "no job" in missing.stderr


# -- the real flow: BreastMNIST through the API -----------------------------------------------
@pytest.fixture(scope="module")
def breast_run(live, shared_data) -> str:
    """Ingest and embed as jobs over HTTP; the embedding run's id."""
    source = str(shared_data / "breastmnist" / "breastmnist.npz")
    ingested = live.wait_job(live.job("ingest", {"source": source, "name": "breast"}))
    assert ingested["status"] == "SUCCEEDED", ingested
    assert ingested["artefact"]["url"] == "/v1/collections/breast"
    collection = live.call("GET", "/v1/collections/breast").json()
    assert collection["summary"]["ingested"] == 780
    embedded = live.wait_job(live.job("embed", {"collection": "breast",
                                                "model": "mobilenetv2-imagenet"}), 400)
    assert embedded["status"] == "SUCCEEDED", embedded
    return embedded["result"]["run_id"]


def test_breastmnist_select_through_the_api(live, breast_run):
    runs = [item["id"] for item in live.call("GET", "/v1/embeddings").json()["items"]]
    assert breast_run in runs
    response = live.call("POST", "/v1/select", json={
        "embedding_run": breast_run, "budget_per_class": 15, "strategy": "kcenter"})
    assert response.status_code == 201, response.text
    body = _read_back(live, response.json()["selection_id"])
    assert body["classes"] == {label: {"archive": n, "selected": 15} for label, n in
                               live.call("GET", "/v1/collections/breast").json()["summary"]
                               ["classes"].items()}


def test_breastmnist_transferability(live, breast_run):
    zoo = live.data / "zoo.yaml"
    zoo.write_text("models:\n  - name: mnv2\n    model: mobilenetv2-imagenet\n"
                   "  - name: lite0\n    model: efficientnet-lite0-imagenet\n")
    response = live.call("POST", "/v1/transferability?wait=true", timeout=400, json={
        "target": "breast", "zoo": str(zoo), "metrics": "lp,logme", "per_class": 20})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "SUCCEEDED", job
    assert sorted(job["result"]["ranking"]) == ["lite0", "mnv2"]
    assert all(model["values"]["lp"] is not None for model in job["result"]["models"])
    assert live.call("GET", job["artefact"]["url"]).json()["summary"]["ranking"] == \
        job["result"]["ranking"]


# -- fuzzing --------------------------------------------------------------------------------
def test_fuzz_finds_no_server_error(live, tmp_path):
    """Schemathesis over /openapi.json (its CLI: its pytest plugin does not load under this
    pytest): every operation but those that start or stop real work, no 5xx."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{live.url}/openapi.json",
         "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {TOKEN}",
         "--max-examples", "10", "--seed", "7", "--workers", "1",  # with 2 threads, CPython
         # 3.11.7's ast.parse (hypothesis describing a filter) fails at random: gh-106905
         "--exclude-name", "POST /v1/jobs", "--exclude-name", "POST /v1/transferability",
         "--exclude-method", "DELETE", "--generation-database", "none", "--no-color"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
        env={**os.environ, "NO_PROXY": "127.0.0.1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# -- settings and the path policy, without a server -------------------------------------------
def test_location_fields_come_from_the_schemas():
    assert location_fields(IngestConfig) == ["source", "metadata"]
    assert location_fields(CurateConfig) == ["source", "metadata", "weights"]
    assert location_fields(EmbedConfig) == ["weights"]
    assert location_fields(ScoreConfig) == ["zoo"]
    assert location_fields(SelectConfig) == []


def test_path_policy_resolves_inside_and_refuses_outside(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "inside").symlink_to(data / "sub")
    (data / "outside").symlink_to(tmp_path)
    policy = PathPolicy([str(data), "s3://bucket/ws"])
    config = policy.confine(IngestConfig(source=str(data / "inside"), name="x"))
    assert config.source == str(data / "sub")
    assert policy.resolve("f", "s3://bucket/ws/archive") == "s3://bucket/ws/archive"
    for path in [str(data / "outside" / "x"), str(data / "sub" / ".." / ".."), str(tmp_path),
                 "s3://bucket/other", "s3://bucket/ws/../other", "gs://bucket/ws/x",
                 str(data) + "-sibling"]:
        with pytest.raises(PathRefused):
            policy.resolve("f", path)


def test_settings_precedence_and_checks(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\n" + "f" * 32 + "\n\n" + "g" * 32 + "\n")
    tokens.chmod(0o600)
    monkeypatch.setenv("MEDCURATE_API_TOKENS", "e" * 32)
    monkeypatch.setenv("MEDCURATE_DATA_ROOTS", str(tmp_path))
    monkeypatch.setenv("MEDCURATE_MAX_PAGE_SIZE", "50")
    from_env = Settings.load({})
    assert [t.get_secret_value() for t in from_env.tokens] == ["e" * 32]
    assert from_env.data_roots == [str(tmp_path.resolve())] and from_env.max_page_size == 50
    from_args = Settings.load({"tokens_file": str(tokens), "max_page_size": "7"})
    assert [t.get_secret_value() for t in from_args.tokens] == ["f" * 32, "g" * 32]
    assert from_args.max_page_size == 7
    for bad, message in [({"tokens": "short"}, "16 characters"),
                         ({"data_roots": str(tmp_path / "missing")}, "not found"),
                         ({"tokens_file": str(tmp_path / "none")}, "tokens file")]:
        with pytest.raises(MedcurateError, match=message):
            Settings.load(bad)
    monkeypatch.delenv("MEDCURATE_API_TOKENS")
    with pytest.raises(MedcurateError, match="no API tokens"):
        Settings.load({})


def test_the_later_of_two_writers_of_one_key_gets_already_exists(tmp_path):
    """Two requests selecting into one id at once both pass the first check; the workspace
    checks again before publishing, so the later one fails and the first stays whole."""
    workspace = Workspace(str(tmp_path / "ws"))
    first = workspace.stage("selections", "same")
    second = workspace.stage("selections", "same")
    for stage, text in ((first, "first"), (second, "second")):
        folder = stage.__enter__()
        workspace.write_bytes(f"{folder}/data.txt", text.encode())
        workspace.write_json(f"{folder}/{PROVENANCE_FILE}", {"writer": text})
    first.__exit__(None, None, None)
    with pytest.raises(AlreadyExists, match="already exists"):
        second.__exit__(None, None, None)
    assert workspace.read_bytes(workspace.path("selections", "same", "data.txt")) == b"first"
    assert workspace.drafts("selections", "same") == []
