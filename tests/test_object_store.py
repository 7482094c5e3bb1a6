"""medcurate with its workspace on a real S3-protocol server (moto and SeaweedFS on 127.0.0.1),
driven through the CLI as a user drives it: the main job, sources that are themselves s3://
URIs, Ray Train storage on the store, and a store that cannot be used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from artefacts import assert_outputs_match_their_hashes
from live_service import report_when_drawn

from medcurate.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def _cli(server, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **server.env(), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "medcurate", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the server, and this process pointed at it as the CLI's is."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    name = f"medws-{uuid.uuid4().hex[:10]}"
    s3_server.make_bucket(name)
    return name


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_the_main_job_runs_on_an_object_store(s3_server, bucket):
    """`medcurate curate --workspace s3://…` on the demo: the archive is uploaded to the store
    (nodes share no disk), ingested from its s3:// location, embedded, selected, published.
    (On SeaweedFS the same job runs submitted to two nodes: tests/test_ray_cluster.py.)"""
    uri = f"s3://{bucket}/medcurate"
    result = _cli(s3_server, "curate", "--budget-per-class", "5", "--workspace", uri)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["report"].startswith(f"s3://{bucket}/medcurate/selections/")
    workspace = Workspace(uri)
    manifest = workspace.read_table(workspace.path("collections", "demo", "manifest.parquet"))
    assert manifest.num_rows == 300
    assert all(u.startswith(f"s3://{bucket}/medcurate/demo-archive/")
               for u in manifest.column("uri").to_pylist())
    for kind, key in (("collections", "demo"), ("embeddings", summary["embedding"]["run_id"]),
                      ("selections", summary["selection"]["selection_id"])):
        assert_outputs_match_their_hashes(workspace, kind, key)
    selected = workspace.read_table(workspace.path("selections", summary["selection"][
        "selection_id"], "selection.parquet"))
    assert selected.num_rows == 15

    again = _cli(s3_server, "curate", "--budget-per-class", "5", "--workspace", uri)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["embedding"]["reused"] is True
    gc = _cli(s3_server, "gc", "--grace-hours", "0", "--workspace", uri)
    assert gc.returncode == 0, gc.stderr
    assert gc.stdout.count("removed selections/") == 1  # the selection curate re-made
    assert_outputs_match_their_hashes(workspace, "selections",
                                      summary["selection"]["selection_id"])


@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)
def test_an_npz_source_on_the_store_is_ingested_into_the_store(s3_server, bucket, shared_data):
    fs = pafs.FileSystem.from_uri(f"s3://{bucket}")[0]
    with fs.open_output_stream(f"{bucket}/sources/breastmnist.npz") as out:
        out.write((shared_data / "breastmnist" / "breastmnist.npz").read_bytes())
    uri = f"s3://{bucket}/ws"
    result = _cli(s3_server, "ingest", f"s3://{bucket}/sources/breastmnist.npz", "--name",
                  "breast", "--workspace", uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["ingested"] == 780
    record = assert_outputs_match_their_hashes(Workspace(uri), "collections", "breast")
    assert record["inputs"][0]["uri"] == f"s3://{bucket}/sources/breastmnist.npz"
    listing = _cli(s3_server, "collections", "list", "--workspace", uri)
    assert listing.stdout.split("\t")[:2] == ["breast", "780 images"]


@pytest.mark.timeout(1500)  # seven commands, each starting its own Ray
@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_pretrain_score_compare_and_audit_run_on_the_store(s3_server, bucket, shared_data,
                                                           tmp_path):
    """The other commands on the same store: pretraining keeps Ray Train's checkpoints in the
    store (jobs/<run>/, emptied once it publishes); the MAE it publishes to s3:// is loaded
    from there as a zoo member (``mae:s3://…``) by the scoring and audit workers."""
    uri = f"s3://{bucket}/ws"

    def ok(*args: str) -> dict:
        result = _cli(s3_server, *args, "--workspace", uri)
        assert result.returncode == 0, (args, result.stderr[-3000:])
        return json.loads(result.stdout)

    ok("ingest", str(shared_data / "breastmnist" / "breastmnist.npz"), "--name", "breast")
    mae = ok("pretrain", "breast", "--name", "mae-breast", "--img-size", "64", "--patch-size",
             "8", "--depth", "2", "--epochs", "1", "--batch-size", "64")
    assert mae["checkpoint"].startswith(f"s3://{bucket}/ws/models/mae-breast/versions/")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {name: mobilenetv2, model: mobilenetv2-imagenet}\n"
                   f"  - {{name: mae-breast, model: \"mae:{mae['checkpoint']}\"}}\n")
    # Scored for another target: for "breast" itself the MAE is a self-source (its provenance
    # says it was pretrained there) and is left out of the ranking.
    ok("ingest", str(shared_data / "breastmnist" / "breastmnist.npz"), "--name", "target")
    scores = ok("score", "target", "--zoo", str(zoo), "--per-class", "10")
    assert sorted(scores["ranking"]) == ["mae-breast", "mobilenetv2"]
    run = ok("embed", "breast", "--model", "mobilenetv2-imagenet")
    ok("compare-selections", run["run_id"], "--strategies", "random", "--budgets", "5",
       "--seeds", "0", "--comparison-id", "cmp", "--no-augment")
    ok("audit", "breast", "--confounder", "tag", "--levels", "0,1", "--zoo", str(zoo),
       "--folds", "1", "--img-size", "64", "--epochs", "1", "--max-train", "60",
       "--max-test", "40", "--permutations", "100", "--audit-id", "tag", "--no-augment")
    workspace = Workspace(uri)
    for kind, key in (("models", "mae-breast"), ("scores", scores["score_id"]),
                      ("comparisons", "cmp"), ("audits", "tag")):
        assert_outputs_match_their_hashes(workspace, kind, key)
    assert workspace.listing(f"{workspace.root}/jobs") == []


def test_a_store_that_cannot_be_used_is_one_clear_error(s3_server, bucket):
    missing = _cli(s3_server, "collections", "list", "--workspace", "s3://no-such-bucket/ws")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: workspace s3://no-such-bucket/ws: the bucket does "
                                     "not exist"), missing.stderr

    class WrongSecret:
        def env(self):
            return {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}

    denied = _cli(WrongSecret(), "ingest", "/nonexistent", "--name", "x", "--workspace",
                  f"s3://{bucket}/ws")
    assert denied.returncode == 2 and "Traceback" not in denied.stderr
    assert denied.stderr.startswith(f"error: workspace s3://{bucket}/ws: the store refused the "
                                    "credentials"), denied.stderr
    assert Workspace(f"s3://{bucket}/ws").listing(f"{bucket}/ws") == []


@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)
def test_the_http_service_serves_a_workspace_on_the_store(s3_server, bucket, tmp_path):
    """`medcurate serve --workspace s3://…`: a selection in the request and one run as a Ray
    job both publish to the store, and the API reads them back from there."""
    import numpy as np
    import requests

    from medcurate.synthetic import write_embedding_run
    from service_process import ServiceProcess

    uri = f"s3://{bucket}/ws"
    rng = np.random.default_rng(0)
    write_embedding_run(Workspace(uri), "syn", rng.normal(size=(600, 16)),
                        [f"class{i % 3}" for i in range(600)], shard_size=250)
    token = uuid.uuid4().hex
    (tmp_path / "tokens").write_text(f"{token}\n")
    (tmp_path / "tokens").chmod(0o600)
    (tmp_path / "data").mkdir()
    http = requests.Session()
    http.trust_env = False
    headers = {"Authorization": f"Bearer {token}"}
    with ServiceProcess(uri, [tmp_path / "data"], tmp_path / "tokens", tmp_path / "serve.log",
                        env={"MEDCURATE_SYNC_SELECT_MAX_ROWS": "1000", **s3_server.env()}) as live:
        created = http.post(f"{live.url}/v1/select", headers=headers, timeout=120, json={
            "embedding_run": "syn--synthetic", "budget_per_class": 4, "strategy": "kcenter"})
        assert created.status_code == 201, created.text
        selection = created.json()["selection_id"]
        report = report_when_drawn(lambda: http.get(
            f"{live.url}/v1/selections/{selection}/report", headers=headers, timeout=60))
        assert report.status_code == 200 and "<html" in report.text.lower()
        job = http.post(f"{live.url}/v1/jobs", headers=headers, timeout=60, json={
            "kind": "select", "params": {"embedding_run": "syn--synthetic",
                                         "budget_per_class": 3, "selection_id": "by-job"}})
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]
        for _ in range(180):
            view = http.get(f"{live.url}/v1/jobs/{job_id}", headers=headers, timeout=60).json()
            if view["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        assert view["status"] == "SUCCEEDED", view
        listed = http.get(f"{live.url}/v1/selections", headers=headers, timeout=60).json()
        assert sorted(item["id"] for item in listed["items"]) == sorted([selection, "by-job"])
    workspace = Workspace(uri)
    for key in (selection, "by-job"):
        assert_outputs_match_their_hashes(workspace, "selections", key)
