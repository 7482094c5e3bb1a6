"""Shortcut audit: how far each source model leans on a confounder.

For every zoo model, confounder level p and fold, a classifier is trained on the collection's
training split with the confounder on a share p of the positives (metadata: the attribute
correlated with the label at strength p), then tested twice on the same test images: i.i.d.
(confounded as in training) and o.o.d. (the confounder on the negatives only: the reversed
correlation). A model that learned the shortcut keeps its i.i.d. AUC as p grows while its o.o.d.
AUC falls. Models are compared per level by a paired permutation test on their o.o.d. AUCs.
Results land in ``audits/<id>/``: results.csv, summary.json, report.html, provenance.json.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa

from medcurate.confounders import confound_mask, metadata_sample
from medcurate.config import AuditConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.models import Preprocessing
from medcurate.provenance import InputRef, Provenance, utc_now
from medcurate.report import curves_figure, html_page, html_table
from medcurate.tables import records_csv
from medcurate.train.evaluation import (classification_metrics, fold_plan, mean_interval,
                                        paired_auc_permutation)
from medcurate.train.finetune import (FitResult, classes_of, fit_classifier, fit_head,
                                      frozen_features, image_table, label_targets,
                                      preprocessing_for, split_rows)
from medcurate.transfer.zoo import load_zoo
from medcurate.workspace import PROVENANCE_FILE, Workspace

RESULTS_FILE = "results.csv"
RESULTS_HEADER = ["model", "level", "fold", "test_set", "metric", "value", "epochs"]
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
TEST_SETS = ("iid", "ood")


def stratified_cap(targets: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``cap`` rows keeping the class shares (all rows without cap)."""
    if cap is None or cap >= len(targets):
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(targets):
        rows = np.flatnonzero(targets == k)
        take = max(1, round(cap * len(rows) / len(targets)))
        keep.append(rng.choice(rows, min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


class _Design:
    """Which rows each run trains, validates and tests on, and which carry the confounder."""

    def __init__(self, config: AuditConfig, targets: dict[str, np.ndarray], positive: int,
                 carriers: dict[str, np.ndarray] | None):
        self.config, self.targets = config, targets
        self.positive, self.carriers = positive, carriers

    def part(self, name: str, index: np.ndarray, level: float, seed: int,
             role: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(row indices, confounder flags) of one set at one level."""
        y = self.targets[name][index]
        if self.carriers is None:  # an image confounder: same rows, some carry it
            return index, confound_mask(y, self.positive, level, seed, role)
        chosen = metadata_sample(y, self.carriers[name][index], self.positive, level, seed, role)
        return index[chosen], None


class _FeatureCache:
    """Frozen-backbone features of every audited image, clean and (for image confounders)
    confounded, per model and seed; each run's rows and flags pick from them."""

    def __init__(self, config: AuditConfig, tables: dict[str, pa.Table],
                 preps: dict[str, Preprocessing], confounder: str | None, workspace: str):
        self.config, self.tables, self.preps, self.confounder = config, tables, preps, confounder
        self.workspace = workspace  # a root URI: where a model:<run> spec is found
        self.features: dict[tuple, np.ndarray] = {}

    def _of(self, entry, split: str, seed: int, confounded: bool) -> np.ndarray:
        key = (entry.name, split, seed if self.confounder else None, confounded)
        if key not in self.features:
            table = self.tables[split]
            rows = image_table(table, np.zeros(table.num_rows, np.int64),
                               np.full(table.num_rows, confounded))
            self.features[key] = frozen_features(entry.model, entry.weights,
                                                 self.preps[entry.name], rows, self.confounder,
                                                 seed, self.config.batch_size,
                                                 workspace=self.workspace)
        return self.features[key]

    def _pick(self, entry, split: str, index: np.ndarray, flags, seed: int) -> np.ndarray:
        x = self._of(entry, split, seed, False)[index]
        if flags is not None and self.confounder and np.any(flags):
            x = np.where(np.asarray(flags, bool)[:, None],
                         self._of(entry, split, seed, True)[index], x)
        return x

    def fit(self, entry, parts: dict, sources: dict, targets: dict, seed: int,
            n_classes: int) -> FitResult:
        x = {p: self._pick(entry, sources[p], index, flags, seed)
             for p, (index, flags) in parts.items()}
        y = {p: targets[sources[p]][index] for p, (index, _) in parts.items()}
        return fit_head({p: (x[p], y[p]) for p in ("train", "val")}, n_classes, self.config,
                        seed, {t: x[t] for t in TEST_SETS})


def _default_id(config: AuditConfig) -> str:
    kind = config.confounder.replace(":", "-")
    return f"{config.collection[:60]}-{kind[:40]}-{config.digest('audit_id')}"


def audit(config: AuditConfig, workspace: Workspace | None = None) -> dict:
    """Run the audit and publish ``audits/<id>/``; returns the summary."""
    workspace = workspace or Workspace()
    started = utc_now()
    audit_id = config.audit_id or _default_id(config)
    workspace.existing("audits", audit_id, config.overwrite, "--audit-id NEW")
    zoo = load_zoo(config.zoo)
    manifest = read_manifest(workspace, config.collection)
    if "split" not in manifest.column_names:
        raise MedcurateError(f"collection {config.collection!r} has no splits; the audit needs "
                             "'train' and 'test' (and uses 'val' where present)")
    tables = {name: split_rows(manifest, name) for name in ("train", "val", "test")}
    for name in ("train", "test"):
        if tables[name].num_rows == 0:
            raise MedcurateError(f"collection {config.collection!r} has no {name!r} split")
    classes, positive = classes_of(tables["train"], config)
    kind, _, column = config.confounder.partition(":")
    if column and column not in manifest.column_names:
        raise MedcurateError(f"collection {config.collection!r} has no column {column!r}")
    targets = {n: label_targets(t, classes, f"split {n!r}") for n, t in tables.items()}
    caps = {"train": config.max_train, "val": config.max_train, "test": config.max_test}
    for name, table in tables.items():
        keep = stratified_cap(targets[name], caps[name], config.seed)
        tables[name], targets[name] = table.take(keep), targets[name][keep]
    carriers = None
    if column:
        carriers = {n: np.array([str(v) == config.carrier for v in t.column(column).to_pylist()])
                    for n, t in tables.items()}
        if not carriers["train"].any():
            raise MedcurateError(f"no training image has {column} == {config.carrier!r}")
    preps = {entry.name: preprocessing_for(entry.model, entry.weights, config.img_size,
                                           workspace=workspace.worker_root)
             for entry in zoo}  # every model is checked before any worker starts

    # The same folds at every level, so levels differ only in the confounder.
    if config.folds == 1 and tables["val"].num_rows:
        folds = [(np.arange(tables["train"].num_rows), None)]
    else:
        folds = fold_plan(targets["train"], config.folds, config.val_fraction, config.seed)
    design = _Design(config, targets, positive, carriers)
    storage = workspace.scratch(audit_id)
    confounder = None if carriers is not None else kind
    # A linear probe without augmentation sees each image's frozen features only: compute
    # them once per model (clean and confounded) and train every level and fold on them.
    cache = _FeatureCache(config, tables, preps, confounder, workspace.worker_root) \
        if config.mode == "linear" and not config.augment and config.num_workers == 1 else None
    records, scores = [], {}
    for level in config.levels:
        for fold, (train_at, val_at) in enumerate(folds):
            seed = config.seed + fold
            val_name, val_at = ("val", np.arange(tables["val"].num_rows)) if val_at is None \
                else ("train", val_at)
            parts = {"train": design.part("train", train_at, level, seed, "train"),
                     "val": design.part(val_name, val_at, level, seed, "iid"),
                     **{t: design.part("test", np.arange(tables["test"].num_rows), level, seed, t)
                        for t in TEST_SETS}}
            sources = {"train": "train", "val": val_name, "iid": "test", "ood": "test"}
            built = None if cache else {
                p: image_table(tables[sources[p]].take(index), targets[sources[p]][index], flags)
                for p, (index, flags) in parts.items()}
            for entry in zoo:
                if cache is not None:
                    result = cache.fit(entry, parts, sources, targets, seed, len(classes))
                else:
                    result = fit_classifier(
                        entry.model, entry.weights, config, len(classes), built["train"],
                        built["val"], {t: built[t] for t in TEST_SETS}, prep=preps[entry.name],
                        storage=storage, name=f"{entry.name}-p{level}-f{fold}",
                        confounder=confounder, seed=seed, workspace=workspace.worker_root)
                for test in TEST_SETS:
                    y = targets["test"][parts[test][0]]
                    probs = result.predictions[test]
                    scores[entry.name, level, fold, test] = (y == positive, probs[:, positive])
                    for metric, value in classification_metrics(y, probs, config.metrics,
                                                                positive).items():
                        records.append({"model": entry.name, "level": level, "fold": fold,
                                        "test_set": test, "metric": metric, "value": value,
                                        "epochs": len(result.history)})
    summary = _summary(config, records, [e.name for e in zoo], scores, len(folds))
    summary.update(audit_id=audit_id, collection=config.collection, classes=classes,
                   positive=classes[positive], confounder=config.confounder,
                   carrier=config.carrier, images={n: t.num_rows for n, t in tables.items()})
    with workspace.stage("audits", audit_id, overwrite=config.overwrite) as staging:
        workspace.write_bytes(f"{staging}/{RESULTS_FILE}", records_csv(records, RESULTS_HEADER))
        workspace.write_json(f"{staging}/{SUMMARY_FILE}", summary)
        workspace.write_bytes(f"{staging}/{REPORT_FILE}", _report(summary, config))
        record = Provenance(
            kind="audit", key=audit_id, started_at=started, config=config.model_dump(),
            seed=config.seed, summary=summary,
            inputs=[InputRef(role="collection", uri=workspace.path("collections",
                                                                   config.collection),
                             sha256=workspace.provenance("collections", config.collection)
                             ["outputs"][MANIFEST_FILE]["sha256"]),
                    InputRef(role="zoo", uri=config.zoo)])
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return summary


def _values(records, **where) -> list[float]:
    return [r["value"] for r in records if all(r[k] == v for k, v in where.items())]


def _summary(config: AuditConfig, records: list[dict], models: list[str], scores: dict,
             n_folds: int) -> dict:
    """Per model, level and metric: i.i.d. and o.o.d. means with intervals and the drop;
    per level: paired permutation tests of o.o.d. AUC between every two models."""
    table = {}
    for model in models:
        table[model] = {}
        for level in config.levels:
            entry = {}
            for metric in config.metrics:
                iid = _values(records, model=model, level=level, metric=metric, test_set="iid")
                ood = _values(records, model=model, level=level, metric=metric, test_set="ood")
                drops = [a - b for a, b in zip(iid, ood) if a is not None and b is not None]
                entry[metric] = {"iid": mean_interval(iid), "ood": mean_interval(ood),
                                 "drop": mean_interval(drops)}
            table[model][str(level)] = entry
    tests = {}
    for level in config.levels:
        pairs = {}
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                folds = range(n_folds)
                pairs[f"{a} vs {b}"] = paired_auc_permutation(
                    [scores[a, level, f, "ood"][0] for f in folds],
                    [scores[a, level, f, "ood"][1] for f in folds],
                    [scores[b, level, f, "ood"][1] for f in folds],
                    config.permutations, config.seed)
        tests[str(level)] = pairs
    return {"models": models, "levels": config.levels, "folds": n_folds,
            "metrics": table, "ood_auc_permutation_tests": tests}


def _report(summary: dict, config: AuditConfig) -> bytes:
    metric = "auc" if "auc" in config.metrics else config.metrics[0]
    levels = summary["levels"]
    curves = []
    for model in summary["models"]:
        per_level = [summary["metrics"][model][str(p)][metric] for p in levels]
        curves += [(f"{model} i.i.d.", levels, [e["iid"] for e in per_level], "-"),
                   (f"{model} o.o.d.", levels, [e["ood"] for e in per_level], "--")]
    png = curves_figure(f"{metric} against confounder level ({config.confounder})",
                        "share p of training positives with the confounder", metric, curves)
    rows = [[model, p, e["iid"]["mean"], e["ood"]["mean"], e["drop"]["mean"]]
            for model in summary["models"] for p in levels
            for e in [summary["metrics"][model][str(p)][metric]]]
    test_rows = [[p, pair, t["difference"], t["p_value"]]
                 for p, pairs in summary["ood_auc_permutation_tests"].items()
                 for pair, t in pairs.items()]
    title = f"Shortcut audit {summary['audit_id']}"
    return html_page(title, [
        f"<h1>{title}</h1>",
        f"<p>Collection {summary['collection']}, confounder {config.confounder}, positive class "
        f"{summary['positive']}, {summary['folds']} fold(s), images {summary['images']}. "
        "i.i.d.: test set confounded as in training; o.o.d.: confounder on the negatives only."
        "</p>", f'<img alt="curves" src="data:image/png;base64,{png}">',
        f"<h2>{metric}: means over folds</h2>",
        html_table(["model", "p", "i.i.d.", "o.o.d.", "drop"], rows),
        "<h2>Paired permutation tests of o.o.d. AUC</h2>",
        html_table(["p", "models", "AUC difference", "p-value"], test_rows)])
