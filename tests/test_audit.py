"""The shortcut audit on real data (PneumoniaMNIST, a zoo of two packaged ImageNet encoders):
the tag confounder shows as an o.o.d. drop, its fast path (frozen features, head on them)
trains what the Ray Train loop trains, and bad parameters are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medcurate.config import AuditConfig, TrainingConfig
from medcurate.ingest import read_manifest
from medcurate.train.audit import audit
from medcurate.train.finetune import (classes_of, fit_classifier, fit_head, frozen_features,
                                      image_table, label_targets, preprocessing_for,
                                      split_rows)
from medcurate.workspace import PROVENANCE_FILE, Workspace

MEDCURATE = Path(sys.executable).with_name("medcurate")


@pytest.mark.parametrize("args, message", [
    (["--levels", "0,1.5"], "levels must lie in [0, 1]"),
    (["--confounder", "metadata:sex"], "needs --carrier"),
    (["--confounder", "blur"], "unknown confounder 'blur'"),
    (["--metrics", "auc,f1"], "unknown metric(s) f1"),
])
def test_audit_cli_refuses_bad_parameters_before_any_work(tmp_path, args, message):
    base = {"--confounder": "tag", "--levels": "0,1", "--zoo": str(tmp_path / "zoo.yaml")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [part for pair in base.items() for part in pair]
    done = subprocess.run([str(MEDCURATE), "audit", "c", *flat, "--workspace",
                           str(tmp_path / "ws")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "ws").exists()


# -- real data on Ray ---------------------------------------------------------------------------
def test_tag_audit_on_pneumoniamnist_shows_the_shortcut(real):
    workspace, zoo = real
    config = AuditConfig(collection="pneumonia", confounder="tag", levels=[0.0, 1.0],
                         zoo=str(zoo), folds=1, img_size=64, augment=False, epochs=10,
                         max_train=240, max_test=160, permutations=300, audit_id="tag")
    summary = audit(config, workspace)
    folder = Path(workspace.path("audits", "tag"))
    for model in ("mobilenetv2", "lite0"):
        clean, tagged = (summary["metrics"][model][p]["auc"] for p in ("0.0", "1.0"))
        # Without the confounder both test sets are alike; with every positive tagged in
        # training the model keys on the tag, and the o.o.d. set (tags on negatives) breaks it.
        assert clean["ood"]["mean"] > 0.7
        assert tagged["iid"]["mean"] > 0.9
        assert tagged["ood"]["mean"] < clean["ood"]["mean"] - 0.2
        assert tagged["drop"]["mean"] > clean["drop"]["mean"] + 0.2
    test = summary["ood_auc_permutation_tests"]["1.0"]["mobilenetv2 vs lite0"]
    assert 0 < test["p_value"] <= 1
    lines = (folder / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 2 * 2  # models x levels x test sets x metrics
    report = (folder / "report.html").read_text()
    assert "data:image/png;base64," in report and "Paired permutation tests" in report
    assert json.loads((folder / PROVENANCE_FILE).read_text())["config"]["confounder"] == "tag"


def test_frozen_feature_probe_equals_the_ray_train_probe(real, tmp_path):
    """The audit's fast path (features once, head on them) trains what the Ray Train loop
    trains on the same rows, confounder flags and seed."""
    workspace, _ = real
    manifest = read_manifest(workspace, "pneumonia")
    training = TrainingConfig(img_size=64, augment=False, epochs=8)
    classes, _ = classes_of(split_rows(manifest, "train"), training)
    tables = {}
    for name, rows in (("train", 120), ("val", 60), ("test", 60)):
        part = split_rows(manifest, name).slice(0, rows)
        flags = np.arange(part.num_rows) % 2 == 0  # half of every set carries the tag
        tables[name] = image_table(part, label_targets(part, classes, name), flags)
    prep = preprocessing_for("mobilenetv2-imagenet", None, 64)
    ray_fit = fit_classifier("mobilenetv2-imagenet", None, training, 2, tables["train"],
                             tables["val"], {"test": tables["test"]}, prep=prep,
                             storage=Workspace(str(tmp_path)).scratch("probe"), name="ray",
                             confounder="tag", seed=3)
    x = {name: frozen_features("mobilenetv2-imagenet", None, prep, table, "tag", 3)
         for name, table in tables.items()}
    y = {name: table.column("target").to_numpy() for name, table in tables.items()}
    fast = fit_head({k: (x[k], y[k]) for k in ("train", "val")}, 2, training, 3,
                    {"test": x["test"]})
    assert len(fast.history) == len(ray_fit.history)
    np.testing.assert_allclose(fast.predictions["test"], ray_fit.predictions["test"], atol=1e-4)
    untagged = frozen_features("mobilenetv2-imagenet", None, prep, tables["test"], None, 3)
    assert not np.allclose(untagged[::2], x["test"][::2])  # the tag reached the features
    np.testing.assert_allclose(untagged[1::2], x["test"][1::2], atol=1e-5)
