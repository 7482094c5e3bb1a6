"""``medcurate score``: rank a zoo of pretrained encoders for a target collection, no fine-tuning.

0. Self-sources: a zoo model whose provenance says it was trained on the target (a fine-tuned
   ``model:<run>``, a workspace MAE) is left out of the ranking, and recorded as excluded.
1. Probe: a class-stratified sample of the target's training images (``per_class`` per class,
   seeded), published as its own collection so its features are cached like any other
   (:mod:`medcurate.transfer.probe`).
2. Features: every zoo model embeds the probe through the embedding pipeline; a finished run
   is reused, so re-scoring (other metrics, a grown zoo) embeds only what is new.
3. Metrics: one Ray task per model computes the per-model metrics of the registry
   (:mod:`medcurate.transfer.registry`, :mod:`medcurate.transfer.tasks`).
4. Across the zoo: NCTI and the paper's score (minmax(LP) x minmax(FU)), the ranking, and the
   Kendall tau between every two metrics' rankings (they often disagree).

``score`` reads as load (``_plan``, ``_encoders``, ``_probe_features``), compute (``score_models``,
``rank_zoo``) and publish (``_publish``). Outputs under ``scores/<id>/``: ``scores.csv`` (one
row per model), ``scores.json`` (everything, with notes on what could not be computed and
why), ``agreement.csv`` and ``provenance.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from medcurate.config import EmbedConfig, ScoreConfig
from medcurate.embed import embed
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.ingest.decode import image_columns
from medcurate.models import create_encoder, source_collections, workspace_weights_sha256
from medcurate.provenance import InputRef, OutputRef, Provenance, sha256_bytes, utc_now
from medcurate.tables import csv_bytes
from medcurate.transfer import metrics as m
from medcurate.transfer.evaluate import metric_agreement
from medcurate.transfer.paper import FU_BATCHES, paper_score
from medcurate.transfer.probe import ensure_probe, probe_indices
from medcurate.transfer.registry import Request, parse_metrics
from medcurate.transfer.tasks import score_models
from medcurate.transfer.zoo import ZooEntry, load_zoo
from medcurate.workspace import PROVENANCE_FILE, Workspace, validate_key

SCORES_CSV, SCORES_JSON, AGREEMENT_CSV = "scores.csv", "scores.json", "agreement.csv"
PAPER_SCORE = "score"  # column of the paper's minmax(LP) x minmax(FU)


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


@dataclass(frozen=True)
class Plan:
    """What a scoring run measures, read and checked before any work: the metric columns,
    the zoo (self-sources left out), the target's manifest and its probe rows, the id."""

    requests: list[Request]
    zoo: list[ZooEntry]
    excluded: dict[str, dict]
    manifest: pa.Table
    manifest_sha: str
    indices: np.ndarray
    classes: Counter
    score_id: str


def _plan(config: ScoreConfig, workspace: Workspace) -> Plan:
    """Load and check the inputs; a target the zoo cannot be scored for fails here."""
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
    return Plan(requests, zoo, excluded, manifest, manifest_sha, indices, classes, score_id)


def _encoders(zoo: list[ZooEntry], workspace: Workspace) -> dict[str, dict]:
    """Every encoder's description, built before any work: unknown specs and missing weights
    fail here."""
    return {e.name: create_encoder(e.model, weights=e.weights, workspace=workspace).describe()
            for e in zoo}


def _probe_features(config: ScoreConfig, plan: Plan,
                    workspace: Workspace) -> tuple[str, dict[str, str]]:
    """The probe collection and every model's embedding run of it, by model name."""
    probe = ensure_probe(workspace, config.target, plan.manifest, plan.manifest_sha,
                         plan.indices, config.per_class, config.seed)
    runs = {e.name: embed(EmbedConfig(collection=probe, model=e.model, weights=e.weights),
                          workspace)["run_id"] for e in plan.zoo}
    return probe, runs


def rank_zoo(zoo: list[ZooEntry], results: dict[str, dict], requests: list[Request],
             runs: dict[str, str]) -> dict:
    """The zoo's values combined (NCTI, the paper's score), ranked, and the metrics'
    agreement: the document's ``ranked_by``, ``metrics``, ``ranking``, ``models`` and
    ``agreement`` matrix."""
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
    return {"ranked_by": ranked_by, "metrics": header, "ranking": [names[i] for i in order],
            "models": models, "agreement": metric_agreement({c: values[c] for c in header})}


def score(config: ScoreConfig, workspace: Workspace | None = None) -> dict:
    """Score every zoo model for the target; publish ``scores/<id>/`` and return its document."""
    workspace = workspace or Workspace()
    started = utc_now()
    plan = _plan(config, workspace)
    if workspace.existing("scores", plan.score_id, config.overwrite):
        return {**workspace.read_json(workspace.path("scores", plan.score_id, SCORES_JSON)),
                "reused": True}
    encoders = _encoders(plan.zoo, workspace)
    clock = time.monotonic()
    probe, runs = _probe_features(config, plan, workspace)
    embedded = time.monotonic()
    image_rows = plan.manifest.select(image_columns(plan.manifest)).take(
        pa.array(plan.indices)).to_pydict()
    results = score_models(plan.zoo, workspace, runs, image_rows, plan.requests)
    ranked = rank_zoo(plan.zoo, results, plan.requests, runs)
    document = {
        "score_id": plan.score_id, "target": config.target, "ranked_by": ranked["ranked_by"],
        "metrics": ranked["metrics"], "ranking": ranked["ranking"], "models": ranked["models"],
        "excluded": plan.excluded,
        "agreement": {"method": "kendall tau between two metrics' scores across the zoo",
                      "matrix": ranked["agreement"]},
        "probe": {"collection": probe, "images": len(plan.indices),
                  "per_class": config.per_class, "seed": config.seed,
                  "classes": {str(k): v for k, v in sorted(plan.classes.items(), key=str)}},
        "timing_s": {"embed": round(embedded - clock, 3),
                     "metrics": round(time.monotonic() - embedded, 3),
                     "total": round(time.monotonic() - clock, 3)},
    }
    _publish(workspace, config, plan, document, runs, encoders, started)
    return {**document, "reused": False}


def _files(document: dict) -> dict[str, bytes]:
    """The published files: the ranking and the agreement as CSV, the document as JSON."""
    header, agreement = document["metrics"], document["agreement"]["matrix"]
    return {
        SCORES_CSV: csv_bytes(["rank", "model", "spec", *header],
                              [[row["rank"], row["model"], row["spec"],
                                *[row["values"][c] for c in header]]
                               for row in document["models"]]),
        AGREEMENT_CSV: csv_bytes(["metric", *header],
                                 [[a, *[agreement[a][b] for b in header]] for a in header]),
        SCORES_JSON: json.dumps(document, indent=2).encode("utf-8"),
    }


def _publish(workspace: Workspace, config: ScoreConfig, plan: Plan, document: dict,
             runs: dict[str, str], encoders: dict[str, dict], started: str) -> None:
    """Write ``scores/<id>/``: the files, then their provenance (inputs by content hash)."""
    files = _files(document)
    probe = document["probe"]["collection"]
    with workspace.stage("scores", plan.score_id, overwrite=config.overwrite) as staging:
        for name, data in files.items():
            workspace.write_bytes(f"{staging}/{name}", data)
        inputs = [InputRef(role="collection", uri=config.target, sha256=plan.manifest_sha),
                  InputRef(role="zoo", uri=str(Path(config.zoo).resolve()),
                           sha256=hashlib.sha256(Path(config.zoo).read_bytes()).hexdigest()),
                  InputRef(role="probe", uri=probe, sha256=workspace.provenance(
                      "collections", probe)["outputs"][MANIFEST_FILE]["sha256"])]
        inputs += [InputRef(role=f"embedding_run:{name}", uri=run,
                            sha256=_provenance_sha256(workspace, "embeddings", run))
                   for name, run in runs.items()]
        record = Provenance(
            kind="score", key=plan.score_id, started_at=started, config=config.model_dump(),
            seed=config.seed, inputs=inputs,
            outputs={name: OutputRef(sha256=sha256_bytes(data), bytes=len(data))
                     for name, data in files.items()},
            summary={"target": config.target, "ranked_by": document["ranked_by"],
                     "ranking": document["ranking"], "excluded": plan.excluded,
                     "probe_images": len(plan.indices),
                     "encoders": encoders, "timing_s": document["timing_s"]})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())


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
