"""The closed-loop selection comparison on real data (BreastMNIST, embedded with a packaged
ImageNet encoder): every strategy trained at equal budgets and seeds, the ceiling, and test
images that repeat training images dropped before scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medcurate.config import CompareConfig, EmbedConfig, IngestConfig
from medcurate.embed import embed
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest
from medcurate.train.compare import _drop_training_duplicates, compare_selections


def test_a_test_split_made_only_of_training_copies_is_refused():
    seen = pa.table({"id": ["a", "b"], "sha256": ["s1", "s2"]})
    by_id = {"a": np.ones(4, np.float32), "b": np.arange(4, dtype=np.float32)}
    copies = pa.table({"id": ["a"], "sha256": ["s1"]})
    with pytest.raises(MedcurateError, match="every test image repeats a training or "
                                             "validation image"):
        _drop_training_duplicates(copies, seen, by_id, 0.99)
    by_id["c"] = np.array([1, -1, 1, -1], np.float32)  # unlike any training image
    kept, dropped = _drop_training_duplicates(
        pa.table({"id": ["a", "c"], "sha256": ["s1", "s9"]}), seen, by_id, 0.99)
    assert kept.column("id").to_pylist() == ["c"]
    assert dropped == {"exact": 1, "near": 0, "near_duplicate_cosine": 0.99}


# -- real data on Ray ---------------------------------------------------------------------------
def test_compare_selections_trains_each_strategy_and_the_ceiling(real, shared_data, tmp_path):
    """On BreastMNIST whose test split also holds 12 byte-copies of training images: the
    comparison drops them before scoring and says so."""
    workspace, _ = real
    with np.load(shared_data / "breastmnist" / "breastmnist.npz") as source:
        arrays = dict(source)
    arrays["test_images"] = np.concatenate([arrays["test_images"], arrays["train_images"][:12]])
    arrays["test_labels"] = np.concatenate([arrays["test_labels"], arrays["train_labels"][:12]])
    np.savez(tmp_path / "breast-dup.npz", **arrays)
    ingest(IngestConfig(source=str(tmp_path / "breast-dup.npz"), name="breast-dup"), workspace)
    run = embed(EmbedConfig(collection="breast-dup", model="mobilenetv2-imagenet"), workspace)
    config = CompareConfig(embedding_run=run["run_id"], strategies=["random", "stratified"],
                           budgets=[5, 20], seeds=[0, 1], augment=False, comparison_id="cmp")
    summary = compare_selections(config, workspace)
    assert summary["trained_on"] == "stored embeddings"
    seen = {image.tobytes() for split in ("train", "val") for image in arrays[f"{split}_images"]}
    copies_already = sum(image.tobytes() in seen for image in arrays["test_images"][:156])
    dropped = summary["test_dropped"]
    assert dropped["exact"] == 12 + copies_already and dropped["near_duplicate_cosine"] == 0.99
    assert summary["test_images"] == 156 - copies_already - dropped["near"]
    for strategy in ("random", "stratified"):
        for budget in ("5", "20"):
            entry = summary["metrics"][strategy][budget]["auc"]
            assert entry["n"] == 2 and entry["low"] <= entry["mean"] <= entry["high"]
    assert summary["ceiling"]["auc"]["mean"] > 0.8
    selections = [k for k in workspace.list("selections") if k.startswith("cmp-")]
    assert len(selections) == 2 * 2 * 2
    for key in selections:  # selected from the train split only, budget per class kept
        table = pq.read_table(Path(workspace.path("selections", key)) / "selection.parquet")
        assert set(table["split"].to_pylist()) == {"train"}
    # Same parameters under another name: the same selections and numbers, exactly.
    again = compare_selections(config.model_copy(update={"comparison_id": "cmp2"}), workspace)
    assert again["metrics"] == summary["metrics"]
    assert "data:image/png;base64," in (Path(workspace.path("comparisons", "cmp"))
                                        / "report.html").read_text()
