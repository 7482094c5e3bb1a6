"""Selection study (issue 9, part 1): which selection strategy gives the best classifier per
labelled image, on real medical data sets, at equal budgets?

One command regenerates ``docs/results/selection_study.{json,csv,md,png}`` with the library's
own functions in one workspace: ``ingest`` → ``embed`` (mobilenetv2-imagenet, 224 px) →
``compare_selections`` (every strategy × budget per class × seed; a linear probe trained on
the stored embeddings; tested on the collection's 'test' split; the whole 'train' split as the
ceiling). Finished artefacts in the workspace are reused, so a re-run only redoes what is
missing; ``--recompute`` redoes every selection and training run (not ingest and embedding).

Data sets (from ``../shared/data``, relative to the repository root, or ``--data``):

- ``ham10000-iid``: HAM10000 (7 classes), a seeded stratified 80/20 train/test split, written
  as a CSV manifest with a ``split`` column and ingested with ``--format csv``.
- ``ham10000-ood``: HAM10000 split by acquisition site: train on rosendahl, vidir_molemax and
  vienna_dias, test on the held-out vidir_modern (see ``HELD_OUT_SITE``).
- ``brain-tumor-mri``: 4 classes, the folders Training/ and Testing/ as train and test.
- ``pneumoniamnist``: 2 classes, the npz's own train / val / test.

    .venv/bin/python bench/selection_study.py                  # the full study (< 1 h, 2 cores)
    .venv/bin/python bench/selection_study.py --quick          # smoke run: 1 set, 2 budgets, 2 seeds
    .venv/bin/python bench/selection_study.py --datasets ham10000-ood --workspace /tmp/ws
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# One thread for every numeric library of this process, set before numpy is first imported
# (see single_threaded_numerics): the same numbers on every machine, whatever its core count.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_WORKSPACE = Path(tempfile.gettempdir()) / "medcurate-selection-study"
DEFAULT_OUT = REPO / "docs" / "results" / "selection_study"
MODEL = "mobilenetv2-imagenet"

STRATEGIES = ["confounder-aware", "random", "stratified", "kcenter", "herding",
              "facility-location", "typicality"]
BUDGETS = [5, 10, 25, 50, 100]
SEEDS = [0, 1, 2, 3, 4]
QUICK = {"datasets": ["pneumoniamnist"], "budgets": [10, 50], "seeds": [0, 1]}
METRICS = ["auc", "balanced-accuracy"]
# The training protocol of every run, ceiling included: a linear probe (dropout 0.5 + linear
# head) on the frozen encoder's stored features, no augmentation, AdamW, early stopping on
# the validation loss keeping the best epoch. Fixed before any result was seen.
PROTOCOL = {"mode": "linear", "augment": False, "epochs": 100, "patience": 10, "lr": 1e-3,
            "weight_decay": 1e-4, "batch_size": 32, "val_fraction": 0.2}

HAM_SPLIT_SEED = 0
HAM_TEST_SHARE = 0.2
# Test site of the o.o.d. split. Images per class (dx) and site in metadata.csv:
#            akiec  bcc  bkl  df  mel   nv  vasc   all
# rosendahl    172  176  287  11  178  433     2  1259
# vidir_modern  11   83  204  21  261  737    29  1346
# vidir_molemax  0    2   85  26   17 2983    46  3159
# vienna_dias    0    3    7   2   35  170     3   220
# vidir_modern is the only site whose test set holds every class (11 to 737 images each, six
# of seven classes 21+) while the other three sites still train every class (39 to 3,586).
# Holding out rosendahl would leave 11 akiec to train on and 2 vasc to test; vidir_molemax
# has no akiec and 2 bcc; vienna_dias is 220 images with 0-3 of four classes.
HELD_OUT_SITE = "vidir_modern"

DATASETS = {
    "ham10000-iid": "HAM10000, i.i.d. split (stratified 80/20, seed 0)",
    "ham10000-ood": f"HAM10000, o.o.d. split (test: held-out site {HELD_OUT_SITE})",
    "brain-tumor-mri": "Brain tumour MRI (Training/Testing)",
    "pneumoniamnist": "PneumoniaMNIST (official train/val/test)",
}


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


# -- sources ------------------------------------------------------------------------------------
def ham_manifest(data: Path, inputs: Path, kind: str) -> Path:
    """Write the HAM10000 CSV manifest (path, dx, split, metadata) of one split; rows in
    image_id order, the same bytes on every run."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    meta = pd.read_csv(data / "ham10000" / "metadata.csv").sort_values("image_id")
    meta = meta.reset_index(drop=True)
    images = data / "ham10000" / "images"
    meta.insert(0, "path", [str(images / f"{i}.jpg") for i in meta["image_id"]])
    missing = [p for p in meta["path"] if not Path(p).is_file()]
    if missing:
        sys.exit(f"error: {len(missing)} HAM10000 images listed in metadata.csv are missing, "
                 f"e.g. {missing[0]}")
    if kind == "iid":
        _, test = train_test_split(meta.index.to_numpy(), test_size=HAM_TEST_SHARE,
                                   random_state=HAM_SPLIT_SEED, stratify=meta["dx"])
        split = ["test" if i in set(test) else "train" for i in meta.index]
    else:
        split = ["test" if s == HELD_OUT_SITE else "train" for s in meta["site"]]
    meta.insert(3, "split", split)
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / f"ham10000-{kind}.csv"
    text = meta.to_csv(index=False, lineterminator="\n")
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def ingest_config(name: str, data: Path, inputs: Path):
    from medcurate.config import IngestConfig

    if name.startswith("ham10000-"):
        source = ham_manifest(data, inputs, name.split("-")[1])
        return IngestConfig(source=str(source), name=name, format="csv", path_column="path",
                            label_column="dx", split_column="split")
    if name == "brain-tumor-mri":
        return IngestConfig(source=str(data / "brain-tumor-mri"), name=name, format="folder")
    return IngestConfig(source=str(data / "pneumoniamnist" / "pneumoniamnist.npz"), name=name,
                        format="npz")


def required_paths(name: str, data: Path) -> list[Path]:
    return {"ham10000-iid": [data / "ham10000" / "metadata.csv", data / "ham10000" / "images"],
            "ham10000-ood": [data / "ham10000" / "metadata.csv", data / "ham10000" / "images"],
            "brain-tumor-mri": [data / "brain-tumor-mri" / "Training",
                                data / "brain-tumor-mri" / "Testing"],
            "pneumoniamnist": [data / "pneumoniamnist" / "pneumoniamnist.npz"]}[name]


# -- process settings ----------------------------------------------------------------------------
def single_threaded_numerics() -> None:
    """One thread for torch, BLAS and FAISS in this process (Ray's embedding actors set
    their own threads). Two reasons, both measured here:

    - Reproducibility: PCA's output differs in the last bits between one and two OpenBLAS
      threads, and UMAP turns that into a different map, so confounder-aware selection picks
      other images (same seed, same data) on a machine with another core count. With the
      thread count fixed, every selection and number repeats exactly.
    - Speed on a shared machine: with two OpenMP threads the ceiling's head training was up
      to 40x slower whenever another job held a core (10 epochs: 120 s instead of 1.3 s)."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    faiss.omp_set_num_threads(1)


def cache_pure_steps() -> None:
    """Memoise two pure library steps that ``compare_selections`` repeats unchanged:

    - ``load_embeddings`` (a finished run is immutable; it was re-read from Parquet for every
      selection, ~0.8 s each, 700 times in the full study);
    - ``class_groups``, a class's PCA + UMAP map and its clusters, which depend on the class's
      embeddings, the seed and the map parameters, never on the budget: the same map was
      rebuilt for each of the five budgets.

    Outputs are unchanged (each cached value is handed out as a deep copy; ``--no-cache``
    runs the library as it is, and the reproducibility check compares the two)."""
    import copy
    import functools
    import hashlib

    import medcurate.select.baselines as baselines
    import medcurate.select.confounder as confounder
    import medcurate.select.run as select_run

    load = select_run.load_embeddings

    @functools.lru_cache(maxsize=2)
    def load_cached(workspace_uri: str, run_id: str, workspace):
        return load(workspace, run_id)

    def load_embeddings(workspace, run_id):
        rows, X = load_cached(workspace.uri, run_id, workspace)
        return rows, X.copy()

    groups = confounder.class_groups
    memo: dict = {}

    def class_groups(Xc, *, transform_map=None, **params):
        digest = hashlib.sha256(Xc.tobytes()).hexdigest() + str(Xc.shape) + str(Xc.dtype)
        key = (digest, json.dumps(params, sort_keys=True, default=str))
        if key not in memo:
            if len(memo) >= 64:
                memo.pop(next(iter(memo)))
            memo[key] = groups(Xc, transform_map=transform_map, **params)
        return copy.deepcopy(memo[key])

    select_run.load_embeddings = load_embeddings
    confounder.class_groups = class_groups
    baselines.class_groups = class_groups


# -- stages ------------------------------------------------------------------------------------
class Timings:
    """Seconds each artefact took when it was computed, kept in the workspace, so a re-run
    that reuses artefacts still reports what computing them cost."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, seconds: float) -> None:
        self.data[key] = {"seconds": round(seconds, 1), "at": datetime.now().isoformat(
            timespec="seconds")}
        self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True))

    def get(self, key: str) -> float | None:
        return self.data.get(key, {}).get("seconds")


def ensure_collection(config, workspace, timings: Timings) -> dict:
    from medcurate.ingest import ingest

    key = f"ingest/{config.name}"
    if workspace.exists("collections", config.name):
        record = workspace.provenance("collections", config.name)
        if record["config"] != config.model_dump():
            sys.exit(f"error: collection {config.name!r} in {workspace.uri} was ingested with "
                     "other settings; use another --workspace")
        log(f"ingest {config.name}: reused")
        return {**record["summary"], "reused": True, "seconds": timings.get(key)}
    log(f"ingest {config.name} from {config.source}")
    start = time.perf_counter()
    summary = ingest(config, workspace)
    timings.record(key, time.perf_counter() - start)
    log(f"ingest {config.name}: {summary['ingested']} images, {summary['rejected']} rejected, "
        f"{timings.get(key):.0f} s")
    return {**summary, "reused": False, "seconds": timings.get(key)}


def ensure_embedding(collection: str, workspace, timings: Timings) -> dict:
    from medcurate.config import EmbedConfig
    from medcurate.embed import default_run_id, embed

    config = EmbedConfig(collection=collection, model=MODEL)
    run_id = default_run_id(config)
    key = f"embed/{run_id}"
    if workspace.exists("embeddings", run_id):
        log(f"embed {collection}: reused {run_id}")
        return {**workspace.provenance("embeddings", run_id)["summary"], "reused": True,
                "seconds": timings.get(key)}
    log(f"embed {collection} with {MODEL}")
    start = time.perf_counter()
    summary = embed(config, workspace)
    seconds = time.perf_counter() - start
    if summary.get("resumed_shards"):
        seconds += timings.get(key) or 0.0  # an interrupted earlier attempt did part of it
    timings.record(key, seconds)
    log(f"embed {collection}: {summary['rows']} images in {seconds:.0f} s "
        f"({summary['rows'] / seconds:.1f} images/s overall)")
    return {**summary, "reused": False, "seconds": timings.get(key)}


def compare_config(run_id: str, dataset: str, args):
    from medcurate.config import CompareConfig

    config = CompareConfig(embedding_run=run_id, strategies=args.strategies,
                           budgets=args.budgets, seeds=args.seeds, metrics=METRICS,
                           **PROTOCOL)
    # Named after the data set and a hash of every setting that shapes the results: the same
    # settings find and reuse the same comparison (and its selections, named after it).
    config.comparison_id = f"study-{dataset}-{config.digest('comparison_id')}"
    return config


def ensure_comparison(config, workspace, timings: Timings, recompute: bool) -> dict:
    from medcurate.train.compare import compare_selections

    key = f"compare/{config.comparison_id}"
    if workspace.exists("comparisons", config.comparison_id) and not recompute:
        log(f"compare {config.comparison_id}: reused")
        seconds, reused = timings.get(key), True
    else:
        log(f"compare {config.comparison_id}: {len(config.strategies)} strategies × "
            f"{len(config.budgets)} budgets × {len(config.seeds)} seeds")
        start = time.perf_counter()
        compare_selections(config.model_copy(update={"overwrite": recompute}), workspace)
        seconds, reused = time.perf_counter() - start, False
        timings.record(key, seconds)
        log(f"compare {config.comparison_id}: {seconds:.0f} s")
    folder = workspace.local_path("comparisons", config.comparison_id)
    summary = json.loads((folder / "summary.json").read_text())
    with open(folder / "results.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    return {"summary": summary, "records": records, "reused": reused, "seconds": seconds,
            "selection_seconds": selection_seconds(workspace, records)}


def selection_seconds(workspace, records: list[dict]) -> dict[str, float]:
    """Wall seconds of selecting, per strategy, from the selections' own provenance."""
    totals: dict[str, float] = {}
    for key in sorted({r["selection"] for r in records if r["selection"]}):
        record = workspace.provenance("selections", key)
        took = (datetime.fromisoformat(record["finished_at"])
                - datetime.fromisoformat(record["started_at"])).total_seconds()
        strategy = record["config"]["strategy"]
        totals[strategy] = totals.get(strategy, 0.0) + took
    return {k: round(v, 1) for k, v in totals.items()}


# -- data facts -------------------------------------------------------------------------------
def split_counts(workspace, collection: str) -> dict[str, dict[str, int]]:
    from collections import Counter

    from medcurate.ingest import read_manifest

    table = read_manifest(workspace, collection, columns=["label", "split"])
    counts = Counter(zip(table.column("split").to_pylist(), table.column("label").to_pylist()))
    out: dict[str, dict[str, int]] = {}
    for (split, label), n in sorted(counts.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        out.setdefault(str(split), {})[str(label)] = n
    return out


# -- statistics --------------------------------------------------------------------------------
def interval(values: list[float]) -> dict:
    from medcurate.train.evaluation import mean_interval

    return mean_interval(values)


def welch(a: list[float], b: list[float]) -> dict:
    """Mean of a − b with a Welch 95% interval (the seeds of two strategies are independent
    draws; nothing pairs them)."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    if se == 0:
        return {"diff": diff, "low": diff, "high": diff}
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, dof) * se)
    return {"diff": diff, "low": diff - half, "high": diff + half}


def values_of(records: list[dict], strategy: str, budget, metric: str) -> list[float]:
    return [float(r["value"]) for r in records if r["strategy"] == strategy
            and (budget is None or int(r["budget"]) == budget) and r["metric"] == metric
            and r["value"] not in ("", "None")]


def contrasts(records: list[dict], strategies: list[str], budgets: list[int]) -> dict:
    """Per budget and metric: the best strategy by mean, confounder-aware's rank, and its
    difference to random and to the best other strategy."""
    out: dict = {}
    for metric in METRICS:
        for budget in budgets:
            means = {s: sum(v) / len(v) for s in strategies
                     if (v := values_of(records, s, budget, metric))}
            order = sorted(means, key=means.get, reverse=True)
            entry = {"best": order[0], "ranking": order}
            if "confounder-aware" in means:
                ca = values_of(records, "confounder-aware", budget, metric)
                entry["confounder_aware_rank"] = order.index("confounder-aware") + 1
                if "random" in means:
                    entry["ca_minus_random"] = welch(ca, values_of(records, "random", budget,
                                                                   metric))
                other = next(s for s in order if s != "confounder-aware")
                entry["best_other"] = other
                entry["ca_minus_best_other"] = welch(ca, values_of(records, other, budget,
                                                                   metric))
            out.setdefault(metric, {})[str(budget)] = entry
    return out


# -- outputs -----------------------------------------------------------------------------------
def fmt(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {(entry['high'] - entry['low']) / 2:.3f}"


def markdown_table(result: dict, metric: str) -> str:
    budgets, table = result["budgets"], result["metrics"]
    header = "| strategy | " + " | ".join(f"N = {b}" for b in budgets) + " |"
    lines = [header, "| --- |" + " --- |" * len(budgets)]
    best = {b: max((s for s in table if table[s][str(b)][metric]["mean"] is not None),
                   key=lambda s: table[s][str(b)][metric]["mean"]) for b in budgets}
    for strategy in [s for s in STRATEGIES if s in table] + [s for s in table
                                                              if s not in STRATEGIES]:
        cells = []
        for b in budgets:
            text = fmt(table[strategy][str(b)][metric])
            cells.append(f"**{text}**" if best[b] == strategy else text)
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    ceiling = result["ceiling"][metric]
    lines.append(f"| all {result['train_images']} (ceiling) | "
                 + " | ".join([fmt(ceiling)] * len(budgets)) + " |")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    parts = ["# Selection study (issue 9, part 1)", "",
             f"Command: `{report['command']}`", "",
             f"Encoder {MODEL} (ImageNet, 224 px), stored embeddings; linear probe "
             f"(dropout 0.5 + linear head), {PROTOCOL['epochs']} epochs at most, patience "
             f"{PROTOCOL['patience']}, AdamW lr {PROTOCOL['lr']:g}, weight decay "
             f"{PROTOCOL['weight_decay']:g}, batch {PROTOCOL['batch_size']}, no augmentation; "
             f"seeds {report['seeds']}. Cells: mean ± half-width of the 95% t-interval over "
             "seeds; bold: best mean at that budget. N: images per class (a class with fewer "
             "training images is taken whole).", ""]
    for name, result in report["datasets"].items():
        parts += [f"## {result['title']}", "",
                  f"Train {result['train_images']} / test {result['test_images']} images; "
                  f"validation: {result['validation']}.", ""]
        for metric in METRICS:
            parts += [f"{metric}:", "", markdown_table(result, metric), ""]
        lines = []
        for b, entry in result["contrasts"]["auc"].items():
            if "ca_minus_random" not in entry:
                continue
            r, o = entry["ca_minus_random"], entry["ca_minus_best_other"]
            lines.append(f"| {b} | {entry['confounder_aware_rank']} of "
                         f"{len(entry['ranking'])} | {r['diff']:+.3f} [{r['low']:+.3f}, "
                         f"{r['high']:+.3f}] | {entry['best_other']}: {o['diff']:+.3f} "
                         f"[{o['low']:+.3f}, {o['high']:+.3f}] |")
        if lines:
            parts += ["Confounder-aware, AUC (Welch 95% intervals of the difference):", "",
                      "| N | rank | − random | − best other |", "| --- | --- | --- | --- |",
                      *lines, ""]
    parts += [f"Runtime: {report['timing']['total_compute_s'] / 60:.1f} min of compute "
              f"(ingest + embed + selections + training) on {report['machine']}.", ""]
    path.write_text("\n".join(parts))


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    names = list(report["datasets"])
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(8.0, 6.4 * cols), 4.4 * rows),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, name in zip(axes.ravel(), names):
        result = report["datasets"][name]
        budgets = result["budgets"]
        lowest = 1.0
        count = len(report["strategies"])
        for index, strategy in enumerate(report["strategies"]):
            cells = [result["metrics"][strategy][str(b)]["auc"] for b in budgets]
            mean = np.array([np.nan if c["mean"] is None else c["mean"] for c in cells])
            low = np.array([np.nan if c["low"] is None else c["low"] for c in cells])
            high = np.array([np.nan if c["high"] is None else c["high"] for c in cells])
            lowest = min(lowest, np.nanmin(mean))
            main = strategy == "confounder-aware"
            # strategies side by side at each budget (multiplicative offsets on the log axis)
            x = np.array(budgets, float) * 1.045 ** (index - (count - 1) / 2)
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o",
                        ms=6 if main else 3.5, lw=2.4 if main else 1.0, capsize=2,
                        elinewidth=1.4 if main else 0.8, color="black" if main
                        else colours(index), label=strategy, zorder=3 if main else 2)
        ceiling = result["ceiling"]["auc"]
        ax.axhline(ceiling["mean"], ls="--", color="grey", lw=1,
                   label=f"all {result['train_images']} (ceiling)")
        if ceiling["low"] is not None:
            ax.axhspan(ceiling["low"], ceiling["high"], color="grey", alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_ylim(max(0.0, min(lowest, ceiling["mean"]) - 0.06), 1.0)
        ax.set(title=result["title"], xlabel="images per class (N)", ylabel="test AUC")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Linear probe on {MODEL} features: mean test AUC and 95% interval over "
                 f"{len(report['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, rows: list[dict], prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["dataset", "strategy", "budget", "seed", "metric", "value",
                                     "selection"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    prefix.with_suffix(".csv").write_text(buffer.getvalue())
    write_markdown(report, prefix.with_suffix(".md"))
    write_plot(report, prefix.with_suffix(".png"))


def check_against(rows: list[dict], committed: Path) -> dict | None:
    """Compare this run's per-seed values with a committed CSV on the cells both hold."""
    if not committed.is_file():
        return None
    with open(committed, newline="") as handle:
        old = {(r["dataset"], r["strategy"], r["budget"], r["seed"], r["metric"]): r["value"]
               for r in csv.DictReader(handle)}
    diffs = []
    for r in rows:
        key = (r["dataset"], r["strategy"], str(r["budget"]), str(r["seed"]), r["metric"])
        if key in old and old[key] not in ("", "None") and r["value"] not in ("", "None"):
            diffs.append(abs(float(old[key]) - float(r["value"])))
    if not diffs:
        return None
    return {"against": str(committed), "cells": len(diffs), "identical": sum(d == 0 for d in diffs),
            "max_abs_diff": max(diffs)}


# -- main ---------------------------------------------------------------------------------------
def comma(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder of the shared data sets (default ../shared/data)")
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help=f"medcurate workspace; finished artefacts in it are reused "
                             f"(default {DEFAULT_WORKSPACE})")
    parser.add_argument("--datasets", type=comma(str), default=None,
                        help=f"comma list of {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--strategies", type=comma(str), default=STRATEGIES)
    parser.add_argument("--budgets", type=comma(int), default=None,
                        help=f"images per class (default {BUDGETS})")
    parser.add_argument("--seeds", type=comma(int), default=None,
                        help=f"seeds of selection and training (default {SEEDS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['datasets'][0]}, budgets {QUICK['budgets']}, "
                             f"seeds {QUICK['seeds']} (unless given); results go to the "
                             "workspace, not docs/results")
    parser.add_argument("--recompute", action="store_true",
                        help="redo every selection and training run (ingest and embeddings "
                             "are still reused)")
    parser.add_argument("--no-cache", action="store_true",
                        help="run the library without the in-process memoisation of embeddings "
                             "and per-class maps (same numbers, slower)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output prefix (default docs/results/selection_study; with "
                             "--quick <workspace>/results/selection_study_quick)")
    args = parser.parse_args()
    if args.quick:
        args.datasets = args.datasets or QUICK["datasets"]
        args.budgets = args.budgets or QUICK["budgets"]
        args.seeds = args.seeds or QUICK["seeds"]
    args.datasets = args.datasets or list(DATASETS)
    args.budgets, args.seeds = args.budgets or BUDGETS, args.seeds or SEEDS
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        sys.exit(f"error: unknown data set(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(DATASETS)}")
    if not args.data.is_dir():
        sys.exit(f"error: the shared data folder {args.data} does not exist; this study needs "
                 "the data sets of ../shared/data (see its README) or --data FOLDER")
    absent = [str(p) for d in args.datasets for p in required_paths(d, args.data)
              if not p.exists()]
    if absent:
        sys.exit(f"error: missing data under {args.data}: {', '.join(absent)}")
    prefix = args.out or (args.workspace / "results" / "selection_study_quick" if args.quick
                          else DEFAULT_OUT)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    single_threaded_numerics()
    if not args.no_cache:
        cache_pure_steps()
    from medcurate.runtime import ensure_ray
    from medcurate.workspace import Workspace

    args.workspace.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(args.workspace))
    inputs = args.workspace / "study-inputs"
    inputs.mkdir(exist_ok=True)
    timings = Timings(inputs / "timings.json")
    log(f"workspace {args.workspace}; data {args.data}; data sets {args.datasets}; "
        f"budgets {args.budgets}; seeds {args.seeds}; strategies {args.strategies}")
    ensure_ray()

    command = "python bench/selection_study.py" + ("" if len(sys.argv) < 2 else " " + " ".join(
        a for a in sys.argv[1:]))
    report = {"command": command, "model": MODEL, "protocol": PROTOCOL, "metrics": METRICS,
              "driver_threads": 1, "memoised": not args.no_cache,
              "strategies": args.strategies, "budgets": args.budgets, "seeds": args.seeds,
              "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                         f"{_memory_gib():.0f} GiB, " + ("GPU" if _has_gpu() else "no GPU"),
              "ham_split": {"iid": {"seed": HAM_SPLIT_SEED, "test_share": HAM_TEST_SHARE},
                            "ood": {"held_out_site": HELD_OUT_SITE}},
              "datasets": {}, "timing": {}}
    rows: list[dict] = []
    compute = 0.0
    for name in args.datasets:
        log(f"== {name}: {DATASETS[name]}")
        collection = ensure_collection(ingest_config(name, args.data, inputs), workspace,
                                       timings)
        embedding = ensure_embedding(name, workspace, timings)
        config = compare_config(embedding["run_id"], name, args)
        comparison = ensure_comparison(config, workspace, timings, args.recompute)
        summary, records = comparison["summary"], comparison["records"]
        counts = split_counts(workspace, name)
        stages = {"ingest_s": collection["seconds"], "embed_s": embedding["seconds"],
                  "compare_s": comparison["seconds"],
                  "selection_s_by_strategy": comparison["selection_seconds"]}
        compute += sum(v or 0.0 for k, v in stages.items() if k.endswith("_s"))
        report["timing"][name] = stages
        train_n = sum(counts.get("train", {}).values())
        report["datasets"][name] = {
            "title": DATASETS[name], "collection": name, "embedding_run": embedding["run_id"],
            "comparison": config.comparison_id, "classes": summary["classes"],
            "counts": counts, "train_images": train_n,
            "test_images": sum(counts.get("test", {}).values()),
            "validation": summary["validation"], "budgets": args.budgets,
            "metrics": summary["metrics"], "ceiling": summary["ceiling"],
            "contrasts": contrasts(records, args.strategies, args.budgets)}
        for r in records:
            rows.append({"dataset": name, "strategy": r["strategy"], "budget": r["budget"],
                         "seed": r["seed"], "metric": r["metric"], "value": r["value"],
                         "selection": r["selection"]})
        ceiling = summary["ceiling"]["auc"]
        log(f"{name}: ceiling AUC {fmt(ceiling)}; AUC by budget: " + "; ".join(
            f"N={b} best {c['best']}" for b, c in report["datasets"][name]["contrasts"]["auc"]
            .items()))
    wall = time.perf_counter() - started
    report["timing"]["total_compute_s"] = round(compute, 1)
    report["timing"]["this_invocation_s"] = round(wall, 1)
    if args.quick or args.recompute:
        check = check_against(rows, DEFAULT_OUT.with_suffix(".csv"))
        if check and prefix != DEFAULT_OUT:
            report["reproducibility"] = check
            log(f"reproducibility against {check['against']}: {check['identical']} of "
                f"{check['cells']} shared per-seed values identical, max |diff| "
                f"{check['max_abs_diff']:.3g}")
    write_outputs(report, rows, prefix)
    log(f"wrote {prefix}.{{json,csv,md,png}}; compute {compute / 60:.1f} min, this run "
        f"{wall / 60:.1f} min")


def _memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
