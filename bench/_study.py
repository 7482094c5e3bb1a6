"""Shared parts of the evidence studies under bench/ (issue 9): the real data sets of
``../shared/data`` as medcurate collections, single-threaded numerics for reproducible numbers,
finished artefacts reused from the study's workspace with the seconds they cost, and the
statistics and formatting every study reports with.

Import this module before numpy is first imported: it pins every numeric library of the process
to one thread (see ``single_threaded_numerics``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "docs" / "results"

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

SOURCES = {  # data set name → title
    "ham10000-iid": "HAM10000, i.i.d. split (stratified 80/20, seed 0)",
    "ham10000-ood": f"HAM10000, o.o.d. split (test: held-out site {HELD_OUT_SITE})",
    "brain-tumor-mri": "Brain tumour MRI (Training/Testing)",
    "pneumoniamnist": "PneumoniaMNIST (official train/val/test)",
    "breastmnist": "BreastMNIST (official train/val/test)",
}


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


# -- sources ------------------------------------------------------------------------------------
# Share of the training images set aside once, before any selection, as the fixed validation
# set of early stopping (PneumoniaMNIST has its own 'val' split): never part of a budget.
VAL_SHARE = 0.1
VAL_SEED = 0


def group_split(labels, groups, share: float, seed: int):
    """Boolean mask of a ``share`` of the rows, stratified by ``labels`` and never splitting a
    ``groups`` id (a lesion, a patient) across the two sides: fold 0 of a seeded
    StratifiedGroupKFold with ``round(1 / share)`` folds."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=round(1 / share), shuffle=True, random_state=seed)
    _, held = next(folds.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def with_validation(split: list[str], labels, groups) -> list[str]:
    """``split`` with a fixed, group-aware ``VAL_SHARE`` of its 'train' rows renamed 'val'."""
    import numpy as np

    split = np.asarray(split, dtype=object)
    train = np.flatnonzero(split == "train")
    held = group_split(np.asarray(labels)[train], np.asarray(groups)[train], VAL_SHARE, VAL_SEED)
    split[train[held]] = "val"
    return split.tolist()


def write_manifest(inputs: Path, name: str, table) -> Path:
    """Write a study manifest (a pandas frame) as ``<inputs>/<name>.csv``, byte-stable."""
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / f"{name}.csv"
    text = table.to_csv(index=False, lineterminator="\n")
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def ham_manifest(data: Path, inputs: Path, kind: str) -> Path:
    """Write the HAM10000 CSV manifest (path, dx, split, metadata) of one split; rows in
    image_id order, the same bytes on every run. Every split groups by ``lesion_id`` (the
    shared copy holds one image per lesion; the full release has several, which a row-wise
    split would leak across train and test)."""
    import pandas as pd

    meta = pd.read_csv(data / "ham10000" / "metadata.csv").sort_values("image_id")
    meta = meta.reset_index(drop=True)
    images = data / "ham10000" / "images"
    meta.insert(0, "path", [str(images / f"{i}.jpg") for i in meta["image_id"]])
    missing = [p for p in meta["path"] if not Path(p).is_file()]
    if missing:
        sys.exit(f"error: {len(missing)} HAM10000 images listed in metadata.csv are missing, "
                 f"e.g. {missing[0]}")
    if kind == "iid":
        test = group_split(meta["dx"].to_numpy(), meta["lesion_id"].to_numpy(),
                           HAM_TEST_SHARE, HAM_SPLIT_SEED)
    else:
        test = (meta["site"] == HELD_OUT_SITE).to_numpy()
    split = ["test" if t else "train" for t in test]
    meta.insert(3, "split", with_validation(split, meta["dx"], meta["lesion_id"]))
    return write_manifest(inputs, f"ham10000-{kind}", meta)


def brain_manifest(data: Path, inputs: Path) -> Path:
    """The brain MRI folders as a CSV manifest: Testing/ is 'test', Training/ is 'train' less
    a fixed validation share. No patient ids exist, so the validation split is per image;
    test images that duplicate a training image are dropped by the comparison itself."""
    import pandas as pd

    root = data / "brain-tumor-mri"
    rows = [{"path": str(p), "label": p.parent.name,
             "split": "test" if folder == "Testing" else "train"}
            for folder in ("Training", "Testing")
            for p in sorted((root / folder).glob("*/*")) if p.is_file()]
    table = pd.DataFrame(rows)
    table["split"] = with_validation(table["split"].tolist(), table["label"],
                                     table["path"])
    return write_manifest(inputs, "brain-tumor-mri", table)


def ingest_config(name: str, data: Path, inputs: Path):
    from medcurate.config import IngestConfig

    if name.startswith("ham10000-"):
        source = ham_manifest(data, inputs, name.split("-")[1])
        return IngestConfig(source=str(source), name=name, format="csv", path_column="path",
                            label_column="dx", split_column="split")
    if name == "brain-tumor-mri":
        return IngestConfig(source=str(brain_manifest(data, inputs)), name=name, format="csv",
                            path_column="path", label_column="label", split_column="split")
    if name in ("pneumoniamnist", "breastmnist"):
        return IngestConfig(source=str(data / name / f"{name}.npz"), name=name, format="npz")
    raise ValueError(f"unknown data set {name!r}")


def required_paths(name: str, data: Path) -> list[Path]:
    return {"ham10000-iid": [data / "ham10000" / "metadata.csv", data / "ham10000" / "images"],
            "ham10000-ood": [data / "ham10000" / "metadata.csv", data / "ham10000" / "images"],
            "brain-tumor-mri": [data / "brain-tumor-mri" / "Training",
                                data / "brain-tumor-mri" / "Testing"],
            "pneumoniamnist": [data / "pneumoniamnist" / "pneumoniamnist.npz"],
            "breastmnist": [data / "breastmnist" / "breastmnist.npz"]}[name]


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


# -- stages ------------------------------------------------------------------------------------
class Timings:
    """Seconds each artefact took when it was computed, kept in the workspace, so a re-run
    that reuses artefacts still reports what computing them cost."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, seconds: float) -> None:
        """Record one entry; the file is re-read first, so two study processes sharing a
        workspace (each running other arms) keep each other's entries."""
        if self.path.is_file():
            self.data = {**json.loads(self.path.read_text()), **self.data}
        self.data[key] = {"seconds": round(seconds, 1), "at": datetime.now().isoformat(
            timespec="seconds")}
        self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True))

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        """Record the seconds the block takes (nothing when it raises)."""
        start = time.perf_counter()
        yield
        self.record(key, time.perf_counter() - start)

    def get(self, key: str) -> float | None:
        return self.data.get(key, {}).get("seconds")


def reused_record(kind: str, key: str, config, workspace) -> dict | None:
    """The provenance of artefact ``key`` made with the same ``config`` (a command's config),
    None where there is none; exit with the reason where one was made otherwise: a study's
    numbers must come from the settings it states."""
    from medcurate.errors import MedcurateError
    from medcurate.workspace import shaping_fields

    try:
        return workspace.reusable(kind, key, config.model_dump(), shaping_fields(config),
                                  "use another --workspace")
    except MedcurateError as exc:
        sys.exit(f"error: {exc}")


def ensure_collection(config, workspace, timings: Timings) -> dict:
    from medcurate.ingest import ingest

    key = f"ingest/{config.name}"
    record = reused_record("collections", config.name, config, workspace)
    if record is not None:
        log(f"ingest {config.name}: reused")
        return {**record["summary"], "reused": True, "seconds": timings.get(key)}
    log(f"ingest {config.name} from {config.source}")
    with timings.measure(key):
        summary = ingest(config, workspace)
    log(f"ingest {config.name}: {summary['ingested']} images, {summary['rejected']} rejected, "
        f"{timings.get(key):.0f} s")
    return {**summary, "reused": False, "seconds": timings.get(key)}


def ensure_embedding(collection: str, workspace, timings: Timings,
                     model: str = "mobilenetv2-imagenet", **options) -> dict:
    from medcurate.config import EmbedConfig
    from medcurate.embed import default_run_id, embed

    config = EmbedConfig(collection=collection, model=model, **options)
    run_id = default_run_id(config, workspace)
    key = f"embed/{run_id}"
    if workspace.exists("embeddings", run_id):
        log(f"embed {collection}: reused {run_id}")
        return {**workspace.provenance("embeddings", run_id)["summary"], "reused": True,
                "seconds": timings.get(key)}
    log(f"embed {collection} with {model}")
    start = time.perf_counter()
    summary = embed(config, workspace)
    seconds = time.perf_counter() - start
    if summary.get("resumed_shards"):
        seconds += timings.get(key) or 0.0  # an interrupted earlier attempt did part of it
    timings.record(key, seconds)
    log(f"embed {collection}: {summary['rows']} images in {seconds:.0f} s "
        f"({summary['rows'] / seconds:.1f} images/s overall)")
    return {**summary, "reused": False, "seconds": timings.get(key)}


def ensure_pretrained(config, workspace, timings: Timings) -> Path:
    """The checkpoint of the MAE ``config`` (a PretrainConfig) pretrains, pretrained now unless
    the workspace has it."""
    from medcurate.train.pretrain import pretrain

    key = f"pretrain/{config.model_name}"
    if reused_record("models", config.model_name, config, workspace) is not None:
        log(f"pretrain {config.model_name}: reused")
    else:
        log(f"pretrain {config.model_name} on {config.collection} ({config.epochs} epochs)")
        with timings.measure(key):
            summary = pretrain(config, workspace)
        log(f"pretrain {config.model_name}: final loss {summary['final_loss']:.4f}, "
            f"{timings.get(key):.0f} s")
    return Path(workspace.require("models", config.model_name)) / "model.pt"


def split_samples(workspace, collection: str, per_class: dict[str, int], seed: int,
                  tag: str) -> dict[str, str]:
    """Class-stratified samples of a collection's splits (``{split: images per class}``),
    published as collections ``<collection>--<tag>-<split><k>-s<seed>[-unseen]-<hash>`` so
    each encoder embeds them once. A test sample draws only test images whose content
    (sha256) no other split holds ('unseen'): the brain MRI set repeats 217 training images
    in its test folder, and a model that trained on an image would be tested on memory."""
    import numpy as np

    from medcurate.ingest import MANIFEST_FILE, read_manifest
    from medcurate.transfer.probe import ensure_subset, probe_indices

    manifest = read_manifest(workspace, collection)
    sha = workspace.provenance("collections", collection)["outputs"][MANIFEST_FILE]["sha256"]
    labels = manifest.column("label").to_pylist()
    splits = np.array(manifest.column("split").to_pylist(), dtype=object)
    content = np.array(manifest.column("sha256").to_pylist(), dtype=object)
    names = {}
    for split, k in per_class.items():
        wanted = splits == split
        unseen = ""
        if split == "test":
            wanted &= ~np.isin(content, content[splits != "test"])
            unseen = "-unseen"
        # probe_indices draws from rows marked 'train': mark the wanted ones so.
        rows = np.sort(probe_indices(labels, np.where(wanted, "train", "other").tolist(), k,
                                     seed))
        name = f"{collection}--{tag}-{split}{k}-s{seed}{unseen}-{sha[:8]}"
        names[split] = ensure_subset(workspace, collection, manifest, sha, rows, name,
                                     {"subset_of": collection, "split": split, "per_class": k,
                                      "seed": seed, "unseen_test": bool(unseen)}, seed)
    return names


def ensure_finetuned(config, workspace, timings: Timings) -> dict:
    """The metrics document of the ``medcurate finetune`` run ``config`` names (a
    FinetuneConfig with its ``run_id`` set), trained now unless the workspace has it."""
    from medcurate.train.finetune import METRICS_FILE, finetune

    if workspace.exists("models", config.run_id):
        return workspace.read_json(workspace.path("models", config.run_id, METRICS_FILE))
    log(f"fine-tune {config.model} on {config.train}, seed {config.seed}")
    with timings.measure(f"finetune/{config.run_id}"):
        document = finetune(config, workspace)
    log(f"fine-tuned {config.run_id}: {timings.get(f'finetune/{config.run_id}'):.0f} s")
    return document


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


def paired(a: dict, b: dict) -> dict | None:
    """Mean of the per-seed differences a − b over the seeds both have (``{seed: value}``),
    with a Student-t 95% interval: a seed fixes both the selection's and the training's
    randomness, so two strategies' runs of one seed are paired. None with under two seeds."""
    import numpy as np
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    diff = float(d.mean())
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"diff": diff, "low": diff - half, "high": diff + half, "seeds": len(d)}


def fmt(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {(entry['high'] - entry['low']) / 2:.3f}"


def check_against(rows: list[dict], committed: Path, keys: list[str],
                  value: str = "value") -> dict | None:
    """Compare this run's values with a committed CSV on the rows both hold (matched on
    ``keys``): how many are identical and the largest difference."""
    if not committed.is_file():
        return None
    with open(committed, newline="") as handle:
        reader = csv.DictReader(handle)
        if not set(keys) <= set(reader.fieldnames or ()):
            return None  # written by an earlier version of the study, with other columns
        old = {tuple(r[k] for k in keys): r[value] for r in reader}
    diffs = []
    for r in rows:
        key = tuple(str(r[k]) for k in keys)
        if key in old and old[key] not in ("", "None") and str(r[value]) not in ("", "None"):
            diffs.append(abs(float(old[key]) - float(r[value])))
    if not diffs:
        return None
    return {"against": str(committed.relative_to(REPO) if committed.is_relative_to(REPO)
                           else committed),
            "cells": len(diffs), "identical": sum(d == 0 for d in diffs),
            "max_abs_diff": max(diffs)}


def comma(kind):
    """argparse type of a comma-separated list."""
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def machine() -> str:
    """This machine in a few words, for the record of where a study ran."""
    import psutil
    import torch

    gpu = "GPU" if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} cores, {platform.machine()}, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}")


def check_data(names: list[str], data: Path) -> None:
    """Exit with one error line when a data set is unknown or its files are absent."""
    unknown = [d for d in names if d not in SOURCES]
    if unknown:
        sys.exit(f"error: unknown data set(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(SOURCES)}")
    if not data.is_dir():
        sys.exit(f"error: the shared data folder {data} does not exist; this study needs "
                 "the data sets of ../shared/data (see its README) or --data FOLDER")
    absent = [str(p) for d in names for p in required_paths(d, data) if not p.exists()]
    if absent:
        sys.exit(f"error: missing data under {data}: {', '.join(absent)}")


def study_inputs(root: Path) -> Path:
    """The study's own files (manifests, zoo YAML, timings) beside the workspace's artefacts."""
    folder = Path(root) / "study-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_study(root: Path):
    """(workspace, inputs folder, timings) of a study's workspace, with Ray started."""
    from medcurate.runtime import ensure_ray
    from medcurate.workspace import Workspace

    Path(root).mkdir(parents=True, exist_ok=True)
    inputs = study_inputs(root)
    ensure_ray()
    return Workspace(str(root)), inputs, Timings(inputs / "timings.json")


def write_results(prefix: Path, report: dict, rows: list[dict], columns: list[str],
                  write_markdown, write_plot) -> None:
    """``<prefix>.{json,csv,md,png}``: the report, one CSV row per value, its text and plot."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    prefix.with_suffix(".csv").write_text(buffer.getvalue())
    write_markdown(report, prefix.with_suffix(".md"))
    write_plot(report, prefix.with_suffix(".png"))
