"""``ingest`` → ``embed`` → ``dedup`` on the brain tumour MRI archive: every test image that is
a byte copy of a training image is reported as a leak, with one of its byte copies as the
training partner. The ground truth is the files' sha256, never the embeddings under test.

../shared/data/README.md counts 217 such test files; one of them is the hidden Jupyter copy
``Testing/meningioma/.ipynb_checkpoints/Te-me_0011-checkpoint.jpg``, which ingest rightly
leaves out (tests/test_ingest_real.py), so the set's 1,311 test images hold 216.

The whole archive is ingested (its ``Training/`` and ``Testing/`` image folders, 7,019 files) to
count the byte copies. Embedding all of it with ``mobilenetv2-imagenet`` takes 6.5 minutes on
this 2-core machine (19 images/s through ``embed``), and ``embed`` has no smaller input side, so
the run embeds a part of the archive: every test image (1,311), every training image that is a
byte copy of one (263), and ``DISTRACTORS`` other training images drawn with a fixed seed, in
shards smaller than the default so that the leaks cross shard boundaries: 1,874 images, about
two minutes (measured 118 s for the file while other work shared the machine).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from medcurate.config import DEDUP_COSINE, DedupConfig, EmbedConfig, IngestConfig
from medcurate.dedup import LEAKS_FILE, dedup
from medcurate.embed import embed
from medcurate.ingest import ingest, read_manifest
from medcurate.workspace import Workspace

FILES_COPIED = 217  # ../shared/data/README.md: Testing files byte-identical to a Training one
CROSS_SPLIT_COPIES = 216  # of them images of the set (not hidden)
DISTRACTORS = 300  # training images embedded beside the test images and their byte copies
SHARD = 512  # rows per embedding shard


def _byte_copies(manifest) -> tuple[list[int], list[int]]:
    """Rows of test images with a byte-identical training image, and rows of those training
    images (same sha256)."""
    split = np.asarray(manifest.column("split").to_pylist())
    sha = np.asarray(manifest.column("sha256").to_pylist())
    shared = np.intersect1d(sha[split == "test"], sha[split == "train"])
    copied = np.isin(sha, shared)
    return (np.flatnonzero(copied & (split == "test")).tolist(),
            np.flatnonzero(copied & (split == "train")).tolist())


def _part_to_embed(manifest, out: Path, seed: int = 0) -> Path:
    """A CSV (path, label, split) of every test image, the training images that are byte copies
    of one, and ``DISTRACTORS`` further training images drawn with ``seed``."""
    split = np.asarray(manifest.column("split").to_pylist())
    _, train_copies = _byte_copies(manifest)
    others = np.setdiff1d(np.flatnonzero(split == "train"), train_copies)
    drawn = np.random.default_rng(seed).choice(others, DISTRACTORS, replace=False)
    rows = np.sort(np.concatenate([np.flatnonzero(split == "test"), train_copies, drawn]))
    columns = {k: manifest.column(k).to_pylist() for k in ("uri", "label", "split")}
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows([columns["uri"][r], columns["label"][r], columns["split"][r]]
                         for r in rows)
    return out


@pytest.fixture(scope="module")
def brain(shared_data, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup-brain")
    workspace = Workspace(str(root / "ws"))
    ingest(IngestConfig(source=str(shared_data / "brain-tumor-mri"), name="brain"), workspace)
    whole = read_manifest(workspace, "brain")
    table = _part_to_embed(whole, root / "part.csv")
    ingest(IngestConfig(source=str(table), name="part", split_column="split"), workspace)
    run = embed(EmbedConfig(collection="part", model="mobilenetv2-imagenet", shard_size=SHARD),
                workspace)
    summary = dedup(DedupConfig(embedding_run=run["run_id"]), workspace)
    return workspace, whole, summary


def _copied_test_files(root: Path) -> list[str]:
    """Every file under Testing/ (hidden ones too) whose bytes equal a file's under Training/,
    hashed here, independently of ingest."""
    digests: dict[str, dict[str, str]] = {"Training": {}, "Testing": {}}
    for split, files in digests.items():
        for folder, _, names in os.walk(root / split):
            for name in names:
                path = Path(folder) / name
                files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    training = set(digests["Training"].values())
    return sorted(p for p, digest in digests["Testing"].items() if digest in training)


def test_the_archive_holds_216_test_images_copied_byte_for_byte_from_training(brain,
                                                                               shared_data):
    _, whole, _ = brain
    test_rows, _ = _byte_copies(whole)
    assert whole.num_rows == 7019 and len(test_rows) == CROSS_SPLIT_COPIES
    files = _copied_test_files(shared_data / "brain-tumor-mri")
    assert len(files) == FILES_COPIED
    relpaths = whole.column("relpath").to_pylist()
    assert sorted(relpaths[r] for r in test_rows) == [f for f in files if "/." not in f]


def test_every_cross_split_byte_copy_is_a_leak_with_a_byte_copy_as_partner(brain):
    workspace, _, summary = brain
    part = read_manifest(workspace, "part")
    test_rows, _ = _byte_copies(part)
    assert len(test_rows) == CROSS_SPLIT_COPIES  # the embedded part holds all of them
    assert summary["threshold"] == DEDUP_COSINE  # the default
    assert summary["images"] == part.num_rows and summary["leaks"] >= CROSS_SPLIT_COPIES
    ids = part.column("id").to_pylist()
    sha = dict(zip(ids, part.column("sha256").to_pylist()))
    leaks = {row["test_id"]: row for row in workspace.read_table(
        workspace.path("dedups", summary["dedup_id"], LEAKS_FILE)).to_pylist()}
    assert len(leaks) == summary["leaks"]
    for row in test_rows:
        leak = leaks.get(ids[row])
        assert leak is not None, f"test image {ids[row]} repeats a training image: not found"
        assert leak["train_split"] == "train" and sha[leak["train_id"]] == sha[ids[row]]
        assert leak["cosine"] >= 1 - 1e-6
    # the other leaks are near copies, not byte copies
    byte_leaks = [t for t, leak in leaks.items() if sha[t] == sha[leak["train_id"]]]
    assert sorted(byte_leaks) == sorted(ids[r] for r in test_rows)
