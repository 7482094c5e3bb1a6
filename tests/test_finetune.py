"""Fine-tuning on Ray Train on real data (BreastMNIST) with the packaged ImageNet encoders;
plus the evaluation it shares with the audit and the comparison (metrics, folds, intervals,
duplicates), augmentation and bad input. The audit is tested in test_audit.py, the selection
comparison in test_compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medcurate.config import FinetuneConfig
from medcurate.errors import MedcurateError
from medcurate.train.evaluation import (check_metrics, classification_metrics,
                                        duplicates_of_training, fold_plan, mean_interval,
                                        paired_auc_permutation)
from medcurate.train.finetune import (METRICS_CSV, METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE,
                                      finetune, make_head, random_affine, train_head)
from medcurate.workspace import PROVENANCE_FILE

QUICK = {"model": "mobilenetv2-imagenet", "img_size": 64, "augment": False, "epochs": 15}


# -- units --------------------------------------------------------------------------------------
def test_random_affine_is_seeded_per_image_and_keeps_shape():
    x = torch.rand(4, 3, 32, 32)
    a = random_affine(x, torch.Generator().manual_seed(1))
    b = random_affine(x, torch.Generator().manual_seed(1))
    c = random_affine(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x, atol=1e-3)
    same = random_affine(x[:1].repeat(2, 1, 1, 1), torch.Generator().manual_seed(3))
    assert not torch.allclose(same[0], same[1])  # each image its own transform
    still = random_affine(x, torch.Generator(), degrees=0, translate=0, shear=0, zoom=(1, 1))
    assert torch.allclose(still, x, atol=1e-5)


def test_train_head_learns_separable_features_and_stops_early():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x[:, 0] += 4 * y  # Bayes AUC 0.998
    tensors = torch.from_numpy(x), torch.from_numpy(y)
    settings = {"epochs": 200, "patience": 3, "batch_size": 32, "lr": 1e-2,
                "weight_decay": 0.0, "seed": 0}
    head = make_head(8, 2)
    state, history = train_head(head, (tensors[0][:300], tensors[1][:300]),
                                (tensors[0][300:], tensors[1][300:]), settings)
    assert len(history) < 200  # early stopping ended it
    best = min(h["val_loss"] for h in history)
    head.load_state_dict(state)
    head.eval()
    probs = torch.softmax(head(tensors[0][300:]), 1).detach().numpy()
    assert roc_auc_score(y[300:], probs[:, 1]) > 0.95 and best < history[0]["val_loss"]


def test_fold_plan_is_stratified_and_disjoint():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    folds = fold_plan(y, 5, 0.2, seed=0)
    assert len(folds) == 5
    held = np.concatenate([val for _, val in folds])
    assert sorted(held.tolist()) == list(range(100))  # each image validates exactly once
    for train, val in folds:
        assert not set(train) & set(val)
        assert np.bincount(y[val]).tolist() == [10, 6, 4]
    (train, val), = fold_plan(y, 1, 0.2, seed=0)
    assert len(val) == 20 and np.bincount(y[val]).tolist() == [10, 6, 4]
    with pytest.raises(MedcurateError, match="at least 5 images"):
        fold_plan(np.array([0] * 10 + [1] * 3), 5, 0.2, seed=0)


def test_metrics_match_sklearn_and_binary_only_metrics_are_refused_on_multiclass():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    probs = rng.dirichlet(np.ones(3), 300)
    probs[np.arange(300), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    values = classification_metrics(y, probs, ["auc", "balanced-accuracy", "accuracy"], 1)
    assert values["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert values["balanced-accuracy"] == pytest.approx(
        balanced_accuracy_score(y, probs.argmax(1)))
    yb = (y == 1).astype(int)
    pb = np.stack([1 - probs[:, 1], probs[:, 1]], 1)
    binary = classification_metrics(yb, pb, ["auc", "sensitivity", "specificity"], 1)
    assert binary["auc"] == pytest.approx(roc_auc_score(yb, pb[:, 1]))
    assert binary["sensitivity"] == pytest.approx(((pb[:, 1] > 0.5) & (yb == 1)).sum()
                                                  / (yb == 1).sum())
    check_metrics(["auc", "sensitivity"], 2)
    with pytest.raises(MedcurateError, match="sensitivity need binary data; this data has 3"):
        check_metrics(["auc", "sensitivity"], 3)


def test_intervals_and_paired_permutation_test():
    assert mean_interval([0.5])["low"] is None
    interval = mean_interval([0.7, 0.8, 0.9])
    assert interval["low"] < 0.8 < interval["high"] and interval["mean"] == pytest.approx(0.8)
    rng = np.random.default_rng(0)
    y = [rng.random(200) < 0.5 for _ in range(2)]
    good = [t + rng.normal(0, 0.5, 200) for t in y]
    noise = [rng.normal(0, 1, 200) for _ in y]
    same = paired_auc_permutation(y, good, good, 200, seed=0)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    apart = paired_auc_permutation(y, good, noise, 200, seed=0)
    assert apart["difference"] > 0.2 and apart["p_value"] < 0.01
    # Scores on another scale but in the same order are the same model: swapping raw scores
    # across scales would make the two look different under the null; ranks do not.
    rescaled = [np.exp(20 * g) for g in good]
    assert paired_auc_permutation(y, good, rescaled, 200, seed=0)["p_value"] == 1.0


def test_duplicates_of_training_finds_exact_and_near_copies():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 16))
    test = np.concatenate([train[:3], train[3:6] + rng.normal(0, 0.01, (3, 16)),
                           rng.normal(size=(4, 16))])
    sha = [f"s{i}" for i in range(50)]
    test_sha = sha[:3] + ["x1", "x2", "x3", "y1", "y2", "y3", "y4"]
    found = duplicates_of_training(test_sha, sha, test, train, 0.98)
    assert found["exact"].tolist() == [True] * 3 + [False] * 7
    assert found["near"].tolist() == [False] * 3 + [True] * 3 + [False] * 4
    exact_only = duplicates_of_training(test_sha, sha, test, train, 1.0)
    assert not exact_only["near"].any()


# -- real data on Ray ---------------------------------------------------------------------------
def test_linear_probe_on_breastmnist_publishes_model_metrics_and_predictions(real):
    workspace, _ = real
    result = finetune(FinetuneConfig(train="breast", run_id="probe", **QUICK), workspace)
    folder = Path(workspace.path("models", "probe"))
    assert result["metrics"]["test"]["auc"]["mean"] > 0.75  # ImageNet features, 546 images
    assert result["images"] == {"train": 546, "test": 156} and result["positive"] == "1"
    predictions = pq.read_table(folder / PREDICTIONS_FILE)
    test = predictions.filter(pa.compute.equal(predictions["test_set"], "test"))
    assert test.num_rows == 156 and predictions.num_rows == 156 + 78  # test + the 'val' split
    probs = np.stack([test["p_0"].to_numpy(), test["p_1"].to_numpy()], 1)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    labels = np.array(test["label"].to_pylist()) == "1"
    assert roc_auc_score(labels, probs[:, 1]) == pytest.approx(
        result["metrics"]["test"]["auc"]["mean"])
    csv_lines = (folder / METRICS_CSV).read_text().splitlines()
    assert csv_lines[0] == "fold,test_set,metric,value" and len(csv_lines) == 1 + 2 * 2
    checkpoint = torch.load(folder / MODEL_FILE, weights_only=False)
    assert checkpoint["classes"] == ["0", "1"] and len(checkpoint["states"]) == 1
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    assert record["config"]["mode"] == "linear" and record["model"]["spec"] == QUICK["model"]
    assert json.loads((folder / METRICS_FILE).read_text())["epochs_trained"][0] <= 15
    with pytest.raises(MedcurateError, match="already exists"):
        finetune(FinetuneConfig(train="breast", run_id="probe", **QUICK), workspace)


def test_full_finetune_with_augmentation_over_two_folds(real):
    workspace, _ = real
    config = FinetuneConfig(train="breast", run_id="full", mode="full", augment=True, folds=2,
                            epochs=2, model="mobilenetv2-imagenet", img_size=32,
                            metrics=["auc", "sensitivity", "specificity"])
    result = finetune(config, workspace)
    assert result["folds"] == 2 and len(result["metrics"]["test"]["auc"]["folds"]) == 2
    for name in ("validation", "test"):
        for metric in ("auc", "sensitivity", "specificity"):
            assert 0.0 <= result["metrics"][name][metric]["mean"] <= 1.0
    states = torch.load(Path(workspace.path("models", "full")) / MODEL_FILE,
                        weights_only=False)["states"]
    first = next(k for k in states[0] if k.startswith("backbone."))
    assert not torch.equal(states[0][first], states[1][first])  # the backbone trained


def test_bad_finetune_input_fails_before_training(real, tmp_path):
    workspace, _ = real
    with pytest.raises(MedcurateError, match="unknown|not found|no "):
        finetune(FinetuneConfig(train="breast", model="no-such-model"), workspace)
    with pytest.raises(MedcurateError, match="no selection or collection named 'nope'"):
        finetune(FinetuneConfig(train="nope", model="mobilenetv2-imagenet"), workspace)
    with pytest.raises(MedcurateError, match="is not a class"):
        finetune(FinetuneConfig(train="breast", positive="7", **QUICK), workspace)
    with pytest.raises(MedcurateError, match="test set 'holdout' has no images"):
        finetune(FinetuneConfig(train="breast", test=["holdout"], **QUICK), workspace)
    # A selection whose ids are not in its collection (the collection was re-ingested).
    with workspace.stage("selections", "stale") as staging:
        workspace.write_table(f"{staging}/selection.parquet",
                              pa.table({"id": ["gone-1", "gone-2"], "label": ["0", "1"]}))
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}",
                             {"summary": {"collection": "breast"}})
    with pytest.raises(MedcurateError, match="2 of its ids are not in collection 'breast'"):
        finetune(FinetuneConfig(train="stale", **QUICK), workspace)


