"""Closed-loop check of selection strategies: is a curated subset worth it?

For every strategy, budget and seed: select from the embedding run's 'train' split (a real
selection artefact, ``<comparison>-<strategy>-n<budget>-s<seed>``, reused when it exists with
the same parameters), train a classifier on it, and test on the collection's 'test' split.
Validation (early stopping) uses the collection's 'val' split where it has one, else a
stratified share of the selection. The same protocol on the whole 'train' split gives the
ceiling. Results: mean and 95% interval over seeds per strategy, budget and metric.

Test images that repeat a training or validation image are dropped before scoring: byte
copies and those within ``near_duplicate_cosine`` of one (the comparison's own check). With
``exclude_duplicates`` (a dedup of the run) every selection, and the ceiling, leaves out the
near-duplicates the dedup removed, and the test images the dedup reports as leaks are dropped
*in addition to* those of the own check, not instead: the own check finds byte copies at any
dedup threshold, and the dedup's leaks add copies that only chain to a training image through
other copies (its groups are connected components) or pass its threshold and not the check's.
A test image either finds is one the model may have seen. ``test_dropped`` records how many
each dropped (``dedup_leaks``: the ones only the dedup found).

A linear probe without augmentation at the encoder's own input size trains the head directly
on the stored embeddings: they are exactly the frozen backbone's features of the same
preprocessed images, so this equals the Ray Train path without decoding every image again.
"""

from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medcurate.config import STRATEGY_PARAMS, CompareConfig, SelectConfig
from medcurate.dedup_use import DedupUse, in_ids, read_dedup
from medcurate.embed import load_embeddings
from medcurate.errors import MedcurateError
from medcurate.ingest import read_manifest
from medcurate.provenance import InputRef, Provenance, outputs_digest, utc_now
from medcurate.report import curves_figure, html_page, html_table
from medcurate.select.run import InputsCache, read_selection, run_selection
from medcurate.tables import records_csv
from medcurate.train.evaluation import (classification_metrics, duplicates_of_training,
                                        fold_plan, mean_interval)
from medcurate.train.finetune import (classes_of, fit_classifier, fit_head, image_table,
                                      label_targets, preprocessing_for, split_rows)
from medcurate.workspace import PROVENANCE_FILE, Workspace, shaping_fields, validate_key

RESULTS_FILE = "results.csv"
RESULTS_HEADER = ["strategy", "budget", "seed", "selection", "metric", "value"]
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
CEILING = "all"  # the strategy name of the whole-train-split reference


def _default_id(config: CompareConfig) -> str:
    return f"{config.embedding_run[:80]}-compare-{config.digest('comparison_id')}"


class _Trainer:
    """Trains and tests one classifier per call, on stored features or through Ray Train."""

    def __init__(self, config: CompareConfig, workspace: Workspace, run_model: dict,
                 classes: list[str], positive: int, features: dict[str, np.ndarray] | None,
                 comparison_id: str):
        self.config, self.classes, self.positive = config, classes, positive
        self.features = features  # id -> embedding, for the stored-feature path
        self.model, self.weights = run_model["spec"], run_model.get("weights")
        self.workspace = workspace.worker_root  # where a model:<run> spec is found
        self.prep = None if features else preprocessing_for(self.model, self.weights,
                                                            config.img_size,
                                                            workspace=self.workspace)
        self.storage = workspace.scratch(comparison_id)

    def __call__(self, train: pa.Table, val: pa.Table, test: pa.Table, seed: int,
                 name: str) -> np.ndarray:
        y = {k: label_targets(t, self.classes, k) for k, t in
             (("train", train), ("val", val), ("test", test))}
        if self.features is None:
            result = fit_classifier(self.model, self.weights, self.config, len(self.classes),
                                    image_table(train, y["train"]), image_table(val, y["val"]),
                                    {"test": image_table(test, y["test"])}, prep=self.prep,
                                    storage=self.storage, name=name, seed=seed,
                                    workspace=self.workspace)
            return result.predictions["test"]
        x = {k: np.stack([self.features[i] for i in t.column("id").to_pylist()])
             for k, t in (("train", train), ("val", val), ("test", test))}
        result = fit_head({k: (x[k], y[k]) for k in ("train", "val")}, len(self.classes),
                          self.config, seed, {"test": x["test"]})
        return result.predictions["test"]


def _selection(config: CompareConfig, workspace: Workspace, strategy: str, budget: int,
               seed: int, comparison_id: str, inputs: InputsCache | None) -> str:
    """The selection's id, made now or reused when an identical one exists. A strategy that
    draws maps draws them with the seed too (``map_seed``): the spread over seeds is then
    the spread over maps, which is most of what varies in a confounder-aware selection."""
    key = validate_key(f"{comparison_id[:90]}-{strategy}-n{budget}-s{seed}")
    map_seed = seed if "map_seed" in STRATEGY_PARAMS[strategy].model_fields else None
    select = SelectConfig(embedding_run=config.embedding_run, budget_per_class=budget,
                          strategy=strategy, seed=seed, map_seed=map_seed, splits=["train"],
                          exclude_duplicates=config.exclude_duplicates, selection_id=key,
                          overwrite=config.overwrite)
    if config.overwrite or workspace.reusable(
            "selections", key, select.model_dump(), shaping_fields(select),
            "pass --overwrite or --comparison-id NEW") is None:
        run_selection(select, workspace, inputs=inputs)
    return key


def compare_selections(config: CompareConfig, workspace: Workspace | None = None, *,
                       inputs: InputsCache | None = None) -> dict:
    """Train on each strategy's selections and publish ``comparisons/<id>/``. ``inputs``: a
    cache of read runs shared by the selections (and by comparisons on the same run, e.g. a
    study's); default: each selection reads the run."""
    workspace = workspace or Workspace()
    started = utc_now()
    comparison_id = config.comparison_id or _default_id(config)
    workspace.existing("comparisons", comparison_id, config.overwrite,
                   "--comparison-id NEW")
    workspace.require("embeddings", config.embedding_run)
    run_record = workspace.provenance("embeddings", config.embedding_run)
    collection = run_record["summary"]["collection"]
    manifest = read_manifest(workspace, collection)
    if "split" not in manifest.column_names:
        raise MedcurateError(f"collection {collection!r} has no splits; the comparison selects "
                             "from 'train' and tests on 'test'")
    train_all, val_split, test = (split_rows(manifest, s) for s in ("train", "val", "test"))
    if not train_all.num_rows or not test.num_rows:
        raise MedcurateError(f"collection {collection!r} needs 'train' and 'test' splits")
    used = read_dedup(workspace, config.exclude_duplicates, config.embedding_run,
                      outputs_digest(run_record)) if config.exclude_duplicates else None
    classes, positive = classes_of(train_all, config)
    stored = config.mode == "linear" and not config.augment and config.img_size is None \
        and config.num_workers == 1
    rows, X = load_embeddings(workspace, config.embedding_run)
    by_id = dict(zip(rows.column("id").to_pylist(), X))
    test, dropped = _drop_training_duplicates(test, pa.concat_tables([train_all, val_split]),
                                              by_id, config.near_duplicate_cosine)
    duplicates = None
    if used:
        train_all, test, duplicates = _without_dedup(used, train_all, test)
        dropped["dedup_leaks"] = duplicates["test_dropped"]
    features = by_id if stored else None
    trainer = _Trainer(config, workspace, run_record["model"], classes, positive, features,
                       comparison_id)
    test_y = label_targets(test, classes, "'test' split")

    def evaluate(train: pa.Table, seed: int, name: str) -> dict:
        if val_split.num_rows:
            val = val_split
        else:
            train_at, val_at = fold_plan(label_targets(train, classes, "selection"), 1,
                                         config.val_fraction, seed)[0]
            train, val = train.take(train_at), train.take(val_at)
        probs = trainer(train, val, test, seed, name)
        return classification_metrics(test_y, probs, config.metrics, positive)

    records = []
    for seed in config.seeds:
        for strategy in config.strategies:
            for budget in config.budgets:
                key = _selection(config, workspace, strategy, budget, seed, comparison_id,
                                 inputs)
                ids = read_selection(workspace, key).column("id")
                chosen = train_all.filter(pc.is_in(train_all["id"], value_set=ids))
                for metric, value in evaluate(chosen, seed, key).items():
                    records.append({"strategy": strategy, "budget": budget, "seed": seed,
                                    "selection": key, "metric": metric, "value": value})
        if not config.ceiling:
            continue
        for metric, value in evaluate(train_all, seed, f"{CEILING}-s{seed}").items():
            records.append({"strategy": CEILING, "budget": train_all.num_rows, "seed": seed,
                            "selection": "", "metric": metric, "value": value})
    summary = _summary(config, records)
    summary.update(comparison_id=comparison_id, embedding_run=config.embedding_run,
                   collection=collection, classes=classes, positive=classes[positive],
                   trained_on="stored embeddings" if stored else "images (Ray Train)",
                   validation="'val' split" if val_split.num_rows else
                   f"{config.val_fraction:.0%} of each selection", test_images=test.num_rows,
                   test_dropped=dropped, **({"duplicates": duplicates} if duplicates else {}))
    with workspace.stage("comparisons", comparison_id, overwrite=config.overwrite) as staging:
        workspace.write_bytes(f"{staging}/{RESULTS_FILE}", records_csv(records, RESULTS_HEADER))
        workspace.write_json(f"{staging}/{SUMMARY_FILE}", summary)
        workspace.write_bytes(f"{staging}/{REPORT_FILE}", _report(summary, config))
        record = Provenance(kind="comparison", key=comparison_id, started_at=started,
                            config=config.model_dump(), seed=config.seeds[0],
                            model=run_record.get("model"), summary=summary,
                            inputs=[InputRef(role="embedding_run", uri=config.embedding_run),
                                    InputRef(role="collection", uri=collection),
                                    *([used.input_ref()] if used else [])])
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return summary


def _drop_training_duplicates(test: pa.Table, seen: pa.Table, by_id: dict,
                              cosine: float) -> tuple[pa.Table, dict]:
    """The test rows that repeat no image of ``seen`` (train and validation), and how many
    were dropped as exact and as near duplicates (``duplicates_of_training``)."""
    def vectors(table: pa.Table) -> np.ndarray | None:
        ids = table.column("id").to_pylist()
        return np.stack([by_id[i] for i in ids]) if ids and all(i in by_id for i in ids) \
            else None

    masks = duplicates_of_training(test.column("sha256").to_pylist(),
                                   seen.column("sha256").to_pylist(), vectors(test),
                                   vectors(seen), cosine)
    keep = ~(masks["exact"] | masks["near"])
    if not keep.any():
        raise MedcurateError("every test image repeats a training or validation image; "
                             "nothing is left to test on")
    return test.filter(pa.array(keep)), {"exact": int(masks["exact"].sum()),
                                         "near": int(masks["near"].sum()),
                                         "near_duplicate_cosine": cosine}


def _without_dedup(used: DedupUse, train: pa.Table, test: pa.Table
                   ) -> tuple[pa.Table, pa.Table, dict]:
    """The 'train' split less the near-duplicates ``used`` removed (the ceiling's training
    set; the selections leave them out themselves), the test rows less its leaks, and what
    was dropped."""
    removed = in_ids(train.column("id"), used.removed)
    leaked = in_ids(test.column("id"), used.leaked)
    if leaked.all():
        raise MedcurateError(f"--exclude-duplicates: every test image is a leak of dedup "
                             f"{used.dedup_id!r}; nothing is left to test on")
    return (train.filter(pa.array(~removed)), test.filter(pa.array(~leaked)),
            used.record(train_excluded=int(removed.sum()), test_dropped=int(leaked.sum())))


def _summary(config: CompareConfig, records: list[dict]) -> dict:
    def values(**where):
        return [r["value"] for r in records if all(r[k] == v for k, v in where.items())]

    table = {strategy: {str(budget): {m: mean_interval(values(strategy=strategy, budget=budget,
                                                              metric=m))
                                      for m in config.metrics}
                        for budget in config.budgets}
             for strategy in config.strategies}
    ceiling = {m: mean_interval(values(strategy=CEILING, metric=m)) for m in config.metrics}
    return {"strategies": config.strategies, "budgets": config.budgets, "seeds": config.seeds,
            "metrics": table, "ceiling": ceiling}


def _dropped_sentence(summary: dict) -> str:
    """What the scores leave out: test images repeating training images, and near-duplicates
    a dedup removed from the training side."""
    dropped, duplicates = summary["test_dropped"], summary.get("duplicates")
    text = (f"Tested on {summary['test_images']} images; dropped as repeats of training or "
            f"validation images: {dropped['exact']} byte copies, {dropped['near']} at cosine "
            f"similarity \u2265 {dropped['near_duplicate_cosine']}")
    if duplicates:
        text += (f", {duplicates['test_dropped']} more that dedup {duplicates['dedup_id']} "
                 f"reports as leaks. Every selection and the ceiling leave out the "
                 f"near-duplicates the dedup removed ({duplicates['train_excluded']} of the "
                 "train split).")
    else:
        text += "; no dedup was used (--exclude-duplicates), so near-copies may share budgets."
    return f"<p>{html.escape(text)}</p>"


def _report(summary: dict, config: CompareConfig) -> bytes:
    parts = [f"<h1>Selection comparison {summary['comparison_id']}</h1>",
             f"<p>Embedding run {summary['embedding_run']}, collection {summary['collection']}; "
             f"{config.mode} training on {summary['trained_on']}, validation on "
             f"{summary['validation']}; seeds {summary['seeds']}. Shaded: 95% interval over "
             "seeds. 'all': the whole train split.</p>", _dropped_sentence(summary)]
    budgets = summary["budgets"]
    for metric in config.metrics:
        curves = [(s, budgets, [summary["metrics"][s][str(b)][metric] for b in budgets], "-")
                  for s in summary["strategies"]]
        ceiling = summary["ceiling"][metric]
        if ceiling["mean"] is not None:
            curves.append((f"{CEILING} (ceiling)", budgets, [ceiling] * len(budgets), ":"))
        png = curves_figure(f"{metric} against budget", "images per class", metric, curves)
        rows = [[s, b, e["mean"], e["low"], e["high"], e["n"]]
                for s in summary["strategies"] for b in budgets
                for e in [summary["metrics"][s][str(b)][metric]]]
        if ceiling["mean"] is not None:
            rows.append([CEILING, "all", ceiling["mean"], ceiling["low"], ceiling["high"],
                         ceiling["n"]])
        parts += [f"<h2>{metric}</h2>", f'<img alt="{metric}" src="data:image/png;base64,{png}">',
                  html_table(["strategy", "budget", "mean", "95% low", "95% high", "seeds"],
                             rows)]
    return html_page(f"Selection comparison {summary['comparison_id']}", parts)
