"""Embedding pipeline on real data: linear-probe quality, resumption after SIGKILL, bad input."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from medcurate.config import EmbedConfig, IngestConfig
from medcurate.embed import EmbeddingRun, embed, load_embeddings
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def _brain_subset(data: Path, out: Path, train_per_class: int, test_per_class: int) -> Path:
    """A CSV manifest of an evenly drawn subset of the brain-tumour MRI archive."""
    rows = []
    for split, folder, count in (("train", "Training", train_per_class),
                                 ("test", "Testing", test_per_class)):
        for label in CLASSES:
            files = sorted((data / "brain-tumor-mri" / folder / label).glob("*.jpg"))
            step = max(1, len(files) // count)
            rows += [{"path": str(f), "label": label, "split": split} for f in files[::step][:count]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def brain_collection(tmp_path_factory, shared_data, ray_session):
    from medcurate.workspace import Workspace

    root = tmp_path_factory.mktemp("embed")
    workspace = Workspace(str(root / "ws"))
    table = _brain_subset(shared_data, root / "brain.csv", 60, 30)
    ingest(IngestConfig(source=str(table), name="brain", split_column="split"), workspace)
    return workspace


def _probe_accuracy(workspace, run_id: str) -> float:
    rows, features = load_embeddings(workspace, run_id)
    split = np.array(rows.column("split").to_pylist())
    labels = np.array(rows.column("label").to_pylist())
    train, test = split == "train", split == "test"
    probe = LogisticRegression(max_iter=2000).fit(features[train], labels[train])
    return float((probe.predict(features[test]) == labels[test]).mean())


def test_imagenet_features_beat_random_init_on_brain_mri(brain_collection):
    pretrained = embed(EmbedConfig(collection="brain", model="mobilenetv2-imagenet"),
                       brain_collection)
    random = embed(EmbedConfig(collection="brain", model="random/mobilenetv2"), brain_collection)
    assert pretrained["rows"] == 360 and pretrained["dim"] == 1280
    accuracy = _probe_accuracy(brain_collection, pretrained["run_id"])
    baseline = _probe_accuracy(brain_collection, random["run_id"])
    # Measured on this subset (240 train / 120 test): ImageNet ≈ 0.85, random init ≈ 0.55.
    assert accuracy > 0.75, accuracy
    assert accuracy > baseline + 0.1, (accuracy, baseline)


def test_rerun_reuses_finished_run_and_provenance_describes_it(brain_collection):
    first = embed(EmbedConfig(collection="brain", model="mobilenetv2-imagenet"), brain_collection)
    again = embed(EmbedConfig(collection="brain", model="mobilenetv2-imagenet"), brain_collection)
    assert again["reused"] is True and again["run_id"] == first["run_id"]
    record = brain_collection.provenance("embeddings", first["run_id"])
    assert record["model"]["spec"] == "mobilenetv2-imagenet"
    assert len(record["model"]["weights_sha256"]) == 64
    assert record["inputs"][0]["sha256"] == brain_collection.provenance(
        "collections", "brain")["outputs"]["manifest.parquet"]["sha256"]


def test_bad_model_spec_fails_before_any_work(brain_collection):
    with pytest.raises(MedcurateError, match="unknown"):
        embed(EmbedConfig(collection="brain", model="no-such-model"), brain_collection)
    with pytest.raises(MedcurateError, match="no collection named 'nope'"):
        embed(EmbedConfig(collection="nope", model="mobilenetv2-imagenet"), brain_collection)


def _cli(*args: str, workspace) -> list[str]:
    return [sys.executable, "-m", "medcurate", *args, "--workspace", workspace.uri]


def _draft(workspace, run_id: str) -> EmbeddingRun | None:
    """The run's unfinished version, where the killed process left one."""
    drafts = workspace.drafts("embeddings", run_id)
    return EmbeddingRun(workspace, run_id, workspace.version_folder(
        "embeddings", run_id, drafts[-1])) if drafts else None


def _kill_then_resume(workspace, env: dict) -> None:
    """Kill the embedding job mid-run; the same command finishes it without recomputing the
    committed shards, and the result equals an uninterrupted run."""
    run_id = "killed"
    env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = _cli("embed", "brain", "--model", "mobilenetv2-imagenet", "--run-id", run_id,
                   "--shard-size", "32", "--batch-size", "8", workspace=workspace)
    process = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while ((run := _draft(workspace, run_id)) is None or len(run.committed()) < 2) \
            and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    done = run.committed()
    assert 2 <= len(done) < 12, f"expected a partial run, found shards {sorted(done)}"
    assert not workspace.exists("embeddings", run_id)

    def stamps() -> dict:
        return {i: workspace.fs.get_file_info(run.shard_path(i)).mtime for i in done}

    before = stamps()
    resumed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(done)} of 12 shards already committed" in resumed.stderr
    assert stamps() == before
    assert workspace.require("embeddings", run_id) == run.root  # the resumed draft went live

    reference = embed(EmbedConfig(collection="brain", model="mobilenetv2-imagenet",
                                  run_id="uninterrupted", shard_size=32), workspace)
    rows, features = load_embeddings(workspace, run_id)
    ref_rows, ref_features = load_embeddings(workspace, reference["run_id"])
    ids = rows.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 360
    assert ids == ref_rows.column("id").to_pylist()
    np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-4)
    outputs = workspace.provenance("embeddings", run_id)["outputs"]
    assert sorted(outputs) == ["run.json"] + [f"shards/shard-{i:05d}.parquet" for i in range(12)]


def test_sigkill_then_rerun_finishes_without_recomputing(brain_collection):
    _kill_then_resume(brain_collection, {})


def test_sigkill_then_rerun_on_an_object_store(tmp_path, shared_data, ray_session, seaweed_s3,
                                               monkeypatch):
    """The same on a real S3-protocol server: shards are objects, the resumed draft is found
    by listing, and the commit is a conditional PUT."""
    from medcurate.workspace import Workspace

    for name, value in seaweed_s3.env().items():
        monkeypatch.setenv(name, value)
    seaweed_s3.make_bucket("embed-resume")
    workspace = Workspace("s3://embed-resume/ws")
    table = _brain_subset(shared_data, tmp_path / "brain.csv", 60, 30)
    ingest(IngestConfig(source=str(table), name="brain", split_column="split"), workspace)
    _kill_then_resume(workspace, seaweed_s3.env())


def test_default_run_ids_are_valid_keys_for_the_longest_names():
    """A 128-character collection embedded with a long spec still gets a valid, distinct id
    (shortened; the digest of the full names keeps two such runs apart)."""
    from medcurate.config import EmbedConfig
    from medcurate.embed import default_run_id
    from medcurate.workspace import MAX_KEY_LENGTH, validate_key

    collection = "c" * MAX_KEY_LENGTH
    ids = {default_run_id(EmbedConfig(collection=collection, model=f"mae:/models/{'p' * 150}{n}"))
           for n in range(2)}
    assert len(ids) == 2 and all(validate_key(i) and len(i) <= MAX_KEY_LENGTH for i in ids)
    short = EmbedConfig(collection="breast", model="mobilenetv2-imagenet")
    assert default_run_id(short).startswith("breast--mobilenetv2-imagenet--")
