"""Ingest of the real archives in ../shared/data: counts, splits, labels and metadata must equal
what the files themselves hold, counted independently here."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medcurate.config import IngestConfig
from medcurate.ingest import MANIFEST_FILE, REJECTS_FILE, ingest, read_manifest
from medcurate.ingest.decode import load_image
from medcurate.workspace import Workspace

MEDCURATE = Path(sys.executable).with_name("medcurate")
BRAIN_SPLITS = {"Training": "train", "Testing": "test"}


def run_cli(*args: str, workspace: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(MEDCURATE), *args, "--workspace", str(workspace)],
                          capture_output=True, text=True, env=env, timeout=300)


# -- brain tumour MRI: an image folder with split and class sub-folders -------------------------
@pytest.fixture(scope="module")
def brain(shared_data, ray_session, tmp_path_factory):
    workspace = Workspace(str(tmp_path_factory.mktemp("brain") / "ws"))
    source = shared_data / "brain-tumor-mri"
    summary = ingest(IngestConfig(source=str(source), name="brain"), workspace)
    return source, summary, read_manifest(workspace, "brain").to_pandas()


def _walk_images(root: Path) -> list[tuple[str, str, str]]:
    """(split folder, class folder, file name) of every non-hidden file, counted by os.walk."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).parts
        for name in files:
            if not name.startswith("."):
                assert len(rel) == 2, f"unexpected layout at {folder}"
                found.append((rel[0], rel[1], name))
    return found


def test_brain_tumor_counts_equal_filesystem(brain):
    source, summary, manifest = brain
    files = _walk_images(source)
    assert len(files) == 7019
    assert len(manifest) == 7019 and summary["ingested"] == 7019
    assert summary["rejected"] == 0

    expected_classes = Counter(cls for _, cls, _ in files)
    expected_splits = Counter(BRAIN_SPLITS[split] for split, _, _ in files)
    expected_pairs = Counter((BRAIN_SPLITS[split], cls) for split, cls, _ in files)
    assert dict(Counter(manifest["label"])) == dict(expected_classes)
    assert dict(Counter(manifest["split"])) == dict(expected_splits)
    assert expected_splits == {"train": 5708, "test": 1311}
    assert Counter(zip(manifest["split"], manifest["label"])) == expected_pairs
    assert summary["classes"] == dict(expected_classes)
    assert summary["splits"] == dict(expected_splits)
    # Every row is exactly one file (hidden checkpoint copies are not images of the set).
    assert set(manifest["relpath"]) == {f"{s}/{c}/{n}" for s, c, n in files}


def test_brain_tumor_rows_are_well_formed(brain):
    source, _, manifest = brain
    assert manifest["id"].is_unique
    assert set(manifest["split"]) == {"train", "test"}
    assert set(manifest["label"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    assert all(Path(uri) == source / rel for uri, rel in zip(manifest["uri"], manifest["relpath"]))
    assert manifest["member"].isna().all()
    assert (manifest[["width", "height"]] > 0).all().all()
    assert set(manifest["bit_depth"]) == {8}
    # exact duplicates all point to an existing row with the same content
    dups = manifest[manifest["duplicate_of"].notna()]
    by_id = manifest.set_index("id")
    assert (by_id.loc[dups["duplicate_of"], "sha256"].to_numpy() == dups["sha256"].to_numpy()).all()


# -- HAM10000: image folder joined to metadata.csv, through the real CLI ------------------------
@pytest.fixture(scope="module")
def ham_cli(shared_data, tmp_path_factory):
    root = shared_data / "ham10000"
    workspace = tmp_path_factory.mktemp("ham") / "ws"
    result = run_cli("ingest", str(root / "images"), "--name", "ham",
                     "--metadata", str(root / "metadata.csv"),
                     "--id-column", "image_id", "--label-column", "dx", workspace=workspace)
    return root, workspace, result


def test_ham10000_cli_ingest_keeps_metadata(ham_cli):
    root, workspace_path, result = ham_cli
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)

    with open(root / "metadata.csv", newline="") as handle:
        rows = {row["image_id"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 5984

    workspace = Workspace(str(workspace_path))
    manifest = read_manifest(workspace, "ham").to_pandas()
    assert len(manifest) == 5984 and summary["ingested"] == 5984
    expected = Counter(row["dx"] for row in rows.values())
    assert summary["classes"] == dict(expected)
    assert dict(Counter(manifest["label"])) == dict(expected)
    assert expected["nv"] == 4323 and expected["df"] == 60
    for column in ("sex", "age", "site", "localization", "dx_type", "lesion_id"):
        assert column in manifest.columns, f"metadata column {column} lost"
    assert "image_id" not in manifest.columns and "dx" not in manifest.columns

    # every row carries the metadata of its own image, not a neighbour's
    for record in manifest.to_dict("records"):
        row = rows[Path(record["relpath"]).stem]
        assert record["label"] == row["dx"]
        assert record["sex"] == row["sex"]
        assert record["site"] == row["site"]
        assert record["localization"] == row["localization"]
        assert (np.isnan(record["age"]) if row["age"] == "" else record["age"] == float(row["age"]))

    rejects = workspace.read_table(f"{workspace.path('collections', 'ham')}/{REJECTS_FILE}")
    assert rejects.num_rows == 0 and summary["rejected"] == 0
    assert rejects.column_names == ["uri", "member", "reason"]


def test_ham10000_cli_output_is_clean(ham_cli):
    _, workspace_path, result = ham_cli
    assert result.returncode == 0, result.stderr
    assert "ingested 5984 images into collection 'ham'" in result.stderr
    # Ray Data's per-run INFO/WARNING chatter stays off the console.
    assert "Progress bars disabled" not in result.stderr
    assert "execution finished" not in result.stderr
    provenance = Workspace(str(workspace_path)).provenance("collections", "ham")
    assert provenance["summary"]["ingested"] == 5984
    assert {ref["role"] for ref in provenance["inputs"]} == {"source", "metadata"}
    assert provenance["outputs"][MANIFEST_FILE]["rows"] == 5984


# -- MedMNIST npz ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pneumoniamnist", "breastmnist"])
def test_medmnist_npz_keeps_splits_labels_and_pixels(shared_data, ray_session, workspace, name):
    path = shared_data / name / f"{name}.npz"
    summary = ingest(IngestConfig(source=str(path), name=name), workspace)
    manifest = read_manifest(workspace, name).to_pandas()
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}

    expected_splits = {s: len(arrays[f"{s}_images"]) for s in ("train", "val", "test")}
    assert dict(Counter(manifest["split"])) == expected_splits
    assert summary["splits"] == expected_splits
    assert summary["ingested"] == sum(expected_splits.values()) == len(manifest)
    assert manifest["id"].is_unique

    for split in expected_splits:
        rows = manifest[manifest["split"] == split]
        index = rows["member"].str.rsplit("/", n=1).str[1].astype(int).to_numpy()
        assert rows["member"].str.startswith(f"{split}/").all()
        assert sorted(index) == list(range(expected_splits[split]))
        labels = arrays[f"{split}_labels"].reshape(-1)
        assert (rows["label"].to_numpy() == labels[index].astype(str)).all()
    assert set(manifest["bit_depth"]) == {8}
    assert set(zip(manifest["width"], manifest["height"], manifest["channels"])) == {(28, 28, 1)}

    rng = np.random.default_rng(0)
    for row in manifest.iloc[rng.choice(len(manifest), 12, replace=False)].itertuples():
        split, index = row.member.rsplit("/", 1)
        pixels = load_image(row.uri, row.member)
        expected_pixels = arrays[f"{split}_images"][int(index)]
        assert pixels.dtype == expected_pixels.dtype
        assert np.array_equal(pixels, expected_pixels)
