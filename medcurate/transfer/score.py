"""``medcurate score``: rank a zoo of pretrained encoders for a target collection, no fine-tuning.

0. Self-sources: a zoo model whose provenance says it was trained on the target (a fine-tuned
   ``model:<run>``, a workspace MAE) is left out of the ranking, and recorded as excluded.
1. Probe: a class-stratified sample of the target's training images (``per_class`` per class,
   seeded), published as its own collection so its features are cached like any other.
2. Features: every zoo model embeds the probe through the embedding pipeline; a finished run
   is reused, so re-scoring (other metrics, a grown zoo) embeds only what is new.
3. Metrics: one Ray task per model computes the feature metrics, the source-prediction metrics
   (from the model's own classifier head where it has one) and FU (one backward pass per
   batch); tasks declare their CPUs, so on a 2-core machine two models run at a time.
4. Across the zoo: NCTI and the paper's score (minmax(LP) x minmax(FU)), the ranking, and the
   Kendall tau between every two metrics' rankings (they often disagree).

Outputs under ``scores/<id>/``: ``scores.csv`` (one row per model), ``scores.json``
(everything, with notes on what could not be computed and why), ``agreement.csv`` and
``provenance.json``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from threadpoolctl import threadpool_limits

from medcurate.config import EmbedConfig, ScoreConfig
from medcurate.embed import embed, load_embeddings
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.ingest.decode import load_rows
from medcurate.models import (create_encoder, fu_layers, preprocess_batch, source_collections,
                              workspace_weights_sha256)
from medcurate.provenance import InputRef, OutputRef, Provenance, utc_now
from medcurate.runtime import ensure_ray
from medcurate.transfer import metrics as m
from medcurate.transfer.evaluate import metric_agreement
from medcurate.transfer.paper import FU_BATCHES, FU_VARIANTS, fu_score, lp_score, paper_score
from medcurate.transfer.zoo import ZooEntry, load_zoo, source_classifier
from medcurate.workspace import PROVENANCE_FILE, Workspace, validate_key

SCORES_CSV, SCORES_JSON, AGREEMENT_CSV = "scores.csv", "scores.json", "agreement.csv"
PAPER_SCORE = "score"  # column of the paper's minmax(LP) x minmax(FU)
NO_SOURCE = "n/a: needs source-task predictions (the model has no classifier head)"


@dataclass(frozen=True)
class Metric:
    compute: Callable | None  # (matrix, labels, [variant=]) -> float; None: computed by the task
    needs: str  # "features", "source" (source-task probabilities) or "images"
    variants: tuple[str, ...] = ()
    default: str | None = None


METRICS: dict[str, Metric] = {
    "lp": Metric(lp_score, "features"),
    "fu": Metric(None, "images", FU_VARIANTS, "paper"),
    "logme": Metric(m.logme, "features", m.REFERENCE_VARIANTS, "exact"),
    "leep": Metric(m.leep, "source", m.LEEP_VARIANTS, "log"),
    "nce": Metric(m.nce, "source"),
    "nleep": Metric(m.nleep, "features", m.NLEEP_VARIANTS, "log"),
    "hscore": Metric(m.hscore, "features"),
    "hscore-reg": Metric(m.regularized_hscore, "features", m.REFERENCE_VARIANTS, "exact"),
    "sfda": Metric(m.sfda, "features", m.REFERENCE_VARIANTS, "exact"),
    "parc": Metric(m.parc, "features", m.REFERENCE_VARIANTS, "exact"),
    "ncti": Metric(m.ncti_terms, "features", m.NCTI_VARIANTS, "minus"),  # combined zoo-wide
    "gbc": Metric(m.gbc, "features", m.GBC_VARIANTS, "diagonal"),
    "transrate": Metric(m.transrate, "features"),
}


@dataclass(frozen=True)
class Request:
    """One output column: a metric and, where it has variants, which one."""

    name: str
    variant: str | None

    @property
    def column(self) -> str:
        default = METRICS[self.name].default
        return self.name if self.variant == default else f"{self.name}:{self.variant}"


def parse_metrics(items: list[str]) -> list[Request]:
    """``all`` or names, each optionally ``NAME:VARIANT``; unknown ones fail before any work."""
    requests: list[Request] = []
    for item in items or ["all"]:
        if item == "all":
            new = [Request(name, METRICS[name].default) for name in METRICS]
        else:
            name, _, variant = item.partition(":")
            metric = METRICS.get(name)
            if metric is None:
                raise MedcurateError(f"unknown metric {item!r} (known: all, "
                                     f"{', '.join(METRICS)})")
            if variant and variant not in metric.variants:
                offer = (f"its variants: {', '.join(metric.variants)}" if metric.variants
                         else "it has no variants")
                raise MedcurateError(f"metric {name!r} has no variant {variant!r} ({offer})")
            new = [Request(name, variant or metric.default)]
        requests += [r for r in new if r not in requests]
    return requests


# -- the probe ----------------------------------------------------------------------------------
def probe_indices(labels: list, splits: list, per_class: int, seed: int) -> np.ndarray:
    """Manifest rows of the probe: ``per_class`` training images of each class (all of a
    smaller class), drawn with ``seed``, in a seeded random order so that FU's unshuffled
    batches mix the classes even where the archive lists them class by class."""
    labels, splits = np.array(labels, dtype=object), np.array(splits, dtype=object)
    usable = np.array([label is not None for label in labels])
    if (splits == "train").any():
        usable &= splits == "train"
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(set(labels[usable].tolist()), key=str):
        rows = np.flatnonzero(usable & (labels == label))
        chosen.append(rng.choice(rows, size=min(per_class, rows.size), replace=False))
    picked = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return rng.permutation(np.sort(picked))


def _output_ref(data: bytes, rows: int | None = None) -> OutputRef:
    return OutputRef(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=rows)


def ensure_probe(workspace: Workspace, target: str, manifest: pa.Table, manifest_sha: str,
                 indices: np.ndarray, per_class: int, seed: int) -> str:
    """Publish the probe as collection ``<target>--probe<k>-s<seed>-<hash>`` (reused if there)."""
    name = validate_key(f"{target}--probe{per_class}-s{seed}-{manifest_sha[:8]}")
    return ensure_subset(workspace, target, manifest, manifest_sha, indices, name,
                         {"probe_of": target, "per_class": per_class, "seed": seed}, seed,
                         kind="probe")


def ensure_subset(workspace: Workspace, source: str, manifest: pa.Table, manifest_sha: str,
                  indices: np.ndarray, name: str, config: dict, seed: int | None = None,
                  kind: str = "subset") -> str:
    """Publish rows ``indices`` of a collection's manifest as collection ``name`` (reused if
    there), so they embed and cache like any collection; ``config`` says how they were drawn."""
    if workspace.exists("collections", name):
        return name
    subset = manifest.take(pa.array(indices))
    sink = pa.BufferOutputStream()
    pq.write_table(subset, sink)
    data = sink.getvalue().to_pybytes()
    classes = Counter(subset.column("label").to_pylist())
    with workspace.stage("collections", name) as staging:
        workspace.write_bytes(f"{staging}/{MANIFEST_FILE}", data)
        record = Provenance(
            kind="collection", key=name, started_at=utc_now(), seed=seed, config=config,
            inputs=[InputRef(role="collection", uri=source, sha256=manifest_sha)],
            outputs={MANIFEST_FILE: _output_ref(data, subset.num_rows)},
            summary={"collection": name, "format": kind, **config,
                     "ingested": subset.num_rows,
                     "classes": {str(k): v for k, v in sorted(classes.items(), key=str)}})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return name


# -- one model (a Ray task) ---------------------------------------------------------------------
def score_model(entry: ZooEntry, workspace_uri: str, run_id: str, image_rows: dict,
                requests: list[Request], threads: int) -> dict:
    """Every requested per-model value for one zoo model: ``{"values", "notes", "timing_s"}``.
    NCTI comes back as its three terms (``ncti-terms``), combined across the zoo later."""
    torch.set_num_threads(threads)
    rows, features = load_embeddings(Workspace(workspace_uri), run_id)
    labels = np.array(rows.column("label").to_pylist(), dtype=object).astype(str)
    encoder = create_encoder(entry.model, weights=entry.weights, workspace=workspace_uri)
    if torch.cuda.is_available():
        encoder = encoder.to("cuda")

    @functools.cache
    def source_probs() -> np.ndarray | None:
        head = source_classifier(encoder)
        return None if head is None else m.softmax(features.astype(np.float64) @ head[0].T
                                                   + head[1])

    def fu(variant: str) -> float:
        images = load_rows(image_rows)
        return fu_score(encoder.backbone, *fu_layers(encoder),
                        lambda idx: torch.from_numpy(preprocess_batch(
                            [images[i] for i in idx], encoder.preprocessing)), labels,
                        embeddings=features, relative=variant == "relative")

    values, notes, timing = {}, {}, {}
    with threadpool_limits(threads):
        for request in requests:
            metric = METRICS[request.name]
            key = "ncti-terms" if request.name == "ncti" else request.column
            if key in values:  # NCTI's terms serve every NCTI variant
                continue
            started = time.monotonic()
            try:
                if metric.needs == "images":
                    values[key] = fu(request.variant)
                elif metric.needs == "source" and source_probs() is None:
                    values[key], notes[key] = None, NO_SOURCE
                elif metric.needs == "source":
                    values[key] = _call(metric, source_probs(), labels, request.variant)
                elif request.name == "ncti":
                    values[key] = list(metric.compute(features, labels))
                else:
                    values[key] = _call(metric, features, labels, request.variant)
            except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
                values[key], notes[key] = None, f"failed: {type(exc).__name__}: {exc}"
            timing[key] = round(time.monotonic() - started, 3)
    return {"values": values, "notes": notes, "timing_s": timing,
            "embed_dim": int(features.shape[1]), "probe_size": int(len(labels))}


def _call(metric: Metric, matrix: np.ndarray, labels: np.ndarray, variant: str | None) -> float:
    kwargs = {"variant": variant} if metric.variants else {}
    return float(metric.compute(matrix, labels, **kwargs))


# -- the zoo ------------------------------------------------------------------------------------
def self_sources(zoo: list[ZooEntry], target: str, workspace: Workspace) -> dict[str, dict]:
    """The zoo's models trained on the target itself, by provenance (through a fine-tuned
    model's starting encoder too), with their spec, sources and why: they have seen the
    target's images, so their scores would not measure transfer; they are left out."""
    excluded = {}
    for entry in zoo:
        sources = source_collections(entry.model, workspace)
        if target in sources:
            excluded[entry.name] = {
                "spec": entry.model, "sources": sources,
                "reason": f"trained on the target {target!r} (by provenance)"}
    return excluded


def _run_models(zoo: list[ZooEntry], workspace: Workspace, runs: dict[str, str],
                image_rows: dict, requests: list[Request]) -> dict[str, dict]:
    """One Ray task per model. Each declares ``cpus // models`` CPUs (at least one, at most 8)
    and runs torch and BLAS on as many threads; they wait on nothing, so they cannot deadlock."""
    ensure_ray()
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    per_task = max(1, min(8, cpus // len(zoo)))
    task = ray.remote(score_model).options(
        num_cpus=per_task, num_gpus=min(1.0, gpus / len(zoo)) if gpus else 0, max_retries=0)
    pending = {task.remote(entry, workspace.worker_root, runs[entry.name], image_rows, requests,
                           per_task):
               entry.name for entry in zoo}
    results = {}
    while pending:
        (done,), _ = ray.wait(list(pending))
        name = pending.pop(done)
        results[name] = ray.get(done)
        print(f"scored {name} in {sum(results[name]['timing_s'].values()):.1f} s",
              file=sys.stderr)
    return results


def _finite(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _zoo_values(zoo: list[ZooEntry], results: dict[str, dict],
                requests: list[Request]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Each column's values across the zoo (NaN where n/a), with NCTI combined and the paper's
    score added where LP and FU were computed; and each model's notes."""
    names = [entry.name for entry in zoo]
    notes = {name: dict(results[name]["notes"]) for name in names}
    values = {}
    for request in requests:
        if request.name == "ncti":
            terms = [results[n]["values"]["ncti-terms"] or [np.nan] * 3 for n in names]
            values[request.column] = m.ncti(terms, request.variant)
        else:
            values[request.column] = np.array(
                [np.nan if (v := results[n]["values"][request.column]) is None else v
                 for n in names], dtype=np.float64)
    for name in names:  # a failure of NCTI's terms concerns every NCTI column
        note = notes[name].pop("ncti-terms", None)
        notes[name].update({r.column: note for r in requests if note and r.name == "ncti"})
    if "lp" in values and "fu" in values:
        values[PAPER_SCORE] = paper_score(values["lp"], values["fu"])
    return values, notes


def _ranking(names: list[str], values: dict[str, np.ndarray], by: str) -> list[int]:
    """Model indices, best first: by ``by``, ties broken by LP then FU, NaN last."""
    def key(i: int):
        tie = [values[c][i] for c in (by, "lp", "fu") if c in values]
        return [-v if np.isfinite(v) else math.inf for v in tie] + [names[i]]

    return sorted(range(len(names)), key=key)


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return text.getvalue().encode("utf-8")


def _provenance_sha256(workspace: Workspace, kind: str, key: str) -> str:
    """A content hash of an artefact: its provenance lists the sha256 of every output file."""
    with workspace.fs.open_input_stream(workspace.path(kind, key, PROVENANCE_FILE)) as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def default_score_id(config: ScoreConfig, zoo: list[ZooEntry], requests: list[Request],
                     manifest_sha: str, workspace: Workspace) -> str:
    """Same target content, zoo (a workspace model by its weights' sha256), metrics and probe
    → same id, so a re-run reuses the result."""
    models = [vars(e) if sha is None else [vars(e), sha]
              for e, sha in ((e, workspace_weights_sha256(e.model, workspace)) for e in zoo)]
    digest = hashlib.sha256(json.dumps(
        [config.target, manifest_sha, models, [r.column for r in requests],
         config.per_class, config.seed]).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(config.zoo).stem)
    return validate_key(f"{config.target}--{stem.strip('-.')[:40] or 'zoo'}--{digest}")


def score(config: ScoreConfig, workspace: Workspace | None = None) -> dict:
    """Score every zoo model for the target; publish ``scores/<id>/`` and return its document."""
    workspace = workspace or Workspace()
    started = utc_now()
    requests = parse_metrics(config.metrics)
    zoo = load_zoo(config.zoo)
    excluded = self_sources(zoo, config.target, workspace)
    zoo = [entry for entry in zoo if entry.name not in excluded]
    if not zoo:
        raise MedcurateError(f"every model of {config.zoo} was trained on {config.target!r} "
                             f"(by provenance: {', '.join(excluded)}); scoring for it needs "
                             "models trained elsewhere")
    manifest = read_manifest(workspace, config.target)
    target_record = workspace.provenance("collections", config.target)
    manifest_sha = target_record["outputs"][MANIFEST_FILE]["sha256"]
    indices = probe_indices(manifest.column("label").to_pylist(),
                            manifest.column("split").to_pylist(), config.per_class, config.seed)
    classes = Counter(manifest.column("label").take(pa.array(indices)).to_pylist())
    if len(classes) < 2:
        found = ", ".join(map(str, classes)) or "none"
        raise MedcurateError(f"collection {config.target!r} has {len(classes)} labelled class(es) "
                             f"among its training images ({found}); ranking models for a target "
                             "needs two or more")
    if any(r.name == "fu" for r in requests) and len(indices) < 3 * FU_BATCHES:
        raise MedcurateError(f"the probe has {len(indices)} images; FU needs {3 * FU_BATCHES} or "
                             "more (raise --per-class)")
    score_id = config.score_id or default_score_id(config, zoo, requests, manifest_sha,
                                                      workspace)
    if workspace.exists("scores", score_id) and not config.overwrite:
        return {**workspace.read_json(workspace.path("scores", score_id, SCORES_JSON)),
                "reused": True}
    # Build every encoder once before any work: unknown specs and missing weights fail here.
    encoders = {e.name: create_encoder(e.model, weights=e.weights, workspace=workspace).describe()
                for e in zoo}
    clock = time.monotonic()
    probe = ensure_probe(workspace, config.target, manifest, manifest_sha, indices,
                         config.per_class, config.seed)
    runs = {e.name: embed(EmbedConfig(collection=probe, model=e.model, weights=e.weights),
                          workspace)["run_id"] for e in zoo}
    embedded = time.monotonic()
    columns = [c for c in ("uri", "member", "window_center", "window_width")
               if c in manifest.column_names]
    image_rows = manifest.select(columns).take(pa.array(indices)).to_pydict()
    results = _run_models(zoo, workspace, runs, image_rows, requests)
    values, notes = _zoo_values(zoo, results, requests)
    names = [entry.name for entry in zoo]
    ranked_by = PAPER_SCORE if PAPER_SCORE in values else requests[0].column
    order = _ranking(names, values, ranked_by)
    header = [c for c in (PAPER_SCORE, *[r.column for r in requests]) if c in values]
    models = [{"rank": rank, "model": names[i], "spec": zoo[i].model, "weights": zoo[i].weights,
               "embedding_run": runs[names[i]], "embed_dim": results[names[i]]["embed_dim"],
               "values": {c: _finite(values[c][i]) for c in header},
               "notes": notes[names[i]], "timing_s": results[names[i]]["timing_s"]}
              for rank, i in enumerate(order, start=1)]
    agreement = metric_agreement({c: values[c] for c in header})
    document = {
        "score_id": score_id, "target": config.target, "ranked_by": ranked_by,
        "metrics": header, "ranking": [names[i] for i in order], "models": models,
        "excluded": excluded,
        "agreement": {"method": "kendall tau between two metrics' scores across the zoo",
                      "matrix": agreement},
        "probe": {"collection": probe, "images": len(indices), "per_class": config.per_class,
                  "seed": config.seed,
                  "classes": {str(k): v for k, v in sorted(classes.items(), key=str)}},
        "timing_s": {"embed": round(embedded - clock, 3),
                     "metrics": round(time.monotonic() - embedded, 3),
                     "total": round(time.monotonic() - clock, 3)},
    }
    files = {
        SCORES_CSV: _csv_bytes(["rank", "model", "spec", *header],
                               [[row["rank"], row["model"], row["spec"],
                                 *[row["values"][c] for c in header]] for row in models]),
        AGREEMENT_CSV: _csv_bytes(["metric", *header],
                                  [[a, *[agreement[a][b] for b in header]] for a in header]),
        SCORES_JSON: json.dumps(document, indent=2).encode("utf-8"),
    }
    with workspace.stage("scores", score_id, overwrite=config.overwrite) as staging:
        for name, data in files.items():
            workspace.write_bytes(f"{staging}/{name}", data)
        inputs = [InputRef(role="collection", uri=config.target, sha256=manifest_sha),
                  InputRef(role="zoo", uri=str(Path(config.zoo).resolve()),
                           sha256=hashlib.sha256(Path(config.zoo).read_bytes()).hexdigest()),
                  InputRef(role="probe", uri=probe, sha256=workspace.provenance(
                      "collections", probe)["outputs"][MANIFEST_FILE]["sha256"])]
        inputs += [InputRef(role=f"embedding_run:{name}", uri=run,
                            sha256=_provenance_sha256(workspace, "embeddings", run))
                   for name, run in runs.items()]
        record = Provenance(
            kind="score", key=score_id, started_at=started, config=config.model_dump(),
            seed=config.seed, inputs=inputs,
            outputs={name: _output_ref(data) for name, data in files.items()},
            summary={"target": config.target, "ranked_by": ranked_by,
                     "ranking": document["ranking"], "excluded": excluded,
                     "probe_images": len(indices),
                     "encoders": encoders, "timing_s": document["timing_s"]})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return {**document, "reused": False}


def format_table(document: dict) -> str:
    """The ranking as a terminal table, then how far the metrics agree, then what is n/a."""
    header = document["metrics"]

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    rows = [[str(row["rank"]), row["model"], *[cell(row["values"][c]) for c in header]]
            for row in document["models"]]
    probe = document["probe"]
    lines = [f"target {document['target']}: probe of {probe['images']} training images "
             f"({probe['per_class']} per class, seed {probe['seed']}), ranked by "
             f"{document['ranked_by']}", *_aligned(["rank", "model", *header], rows), "",
             "agreement: " + document["agreement"]["method"]]
    matrix = document["agreement"]["matrix"]
    lines += _aligned(["", *header], [[a, *[cell(matrix[a][b]) for b in header]]
                                      for a in header])
    notes = [f"{row['model']}, {column}: {note}" for row in document["models"]
             for column, note in row["notes"].items()]
    notes += [f"{name}: excluded, {why['reason']}"
              for name, why in document.get("excluded", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip()
            for row in [header, *rows]]
