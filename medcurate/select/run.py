"""A selection run: embeddings + collection metadata → ``selections/<id>/``.

Writes ``selection.parquet`` (id, label, split, group, rank, reason, strata columns),
``map.parquet`` (every image's 2-D position and group, where the strategy builds a map),
``summary.json`` (archive vs selection counts per class, group and metadata value),
``report.html`` and the provenance sidecar, all published together.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medcurate import backends
from medcurate.config import POOL_STRATEGIES, SelectConfig
from medcurate.embed import load_embeddings
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.ingest.sources import CORE_COLUMNS
from medcurate.provenance import InputRef, Provenance, utc_now
from medcurate.report import write_report
from medcurate.runtime import NodesSeen, ensure_ray, this_node
from medcurate.select import select, strategy_params
from medcurate.select.synthesis import publish_synthetic, synthetic_collection_name
from medcurate.workspace import PROVENANCE_FILE, Workspace

SELECTION_FILE = "selection.parquet"
MAP_FILE = "map.parquet"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
MAX_REPORT_VALUES = 20  # metadata columns with more distinct values are not charted
MISSING = "(missing)"


def default_selection_id(config: SelectConfig, collection: str) -> str:
    digest = hashlib.sha256(json.dumps(config.model_dump(exclude={"overwrite"}),
                                       sort_keys=True).encode()).hexdigest()[:8]
    size = f"f{config.fraction:g}" if config.fraction else f"n{config.budget_per_class}"
    return f"{collection}-{config.strategy}-{size}-s{config.seed}-{digest}"


class RayTransformMap:
    """Run ``fn`` over chunks as Ray tasks (UMAP transform of a million points in parallel),
    remembering which nodes ran them for the selection's provenance."""

    def __init__(self):
        self.nodes = NodesSeen()

    def __call__(self, fn, chunks: list) -> list:
        import ray

        ensure_ray()
        fn_ref = ray.put(fn)
        apply = ray.remote(lambda f, chunk: (this_node(), f(chunk)))
        done = ray.get([apply.remote(fn_ref, chunk) for chunk in chunks])
        self.nodes.take("umap_transform", [node for node, _ in done])
        return [result for _, result in done]


def _values(table: pa.Table, column: str) -> np.ndarray:
    return np.array([MISSING if v is None else str(v) for v in table.column(column).to_pylist()],
                    dtype=object)


def report_columns(metadata: pa.Table, stratify_by: list[str]) -> list[str]:
    """Metadata worth charting: the strata, then categorical columns of few distinct values."""
    columns = list(stratify_by)
    for name in ["split", *metadata.column_names]:
        if name in columns or (name in CORE_COLUMNS and name != "split"):
            continue
        if name in ("window_center", "window_width") or name not in metadata.column_names:
            continue
        field = metadata.schema.field(name)
        if not (pa.types.is_string(field.type) or pa.types.is_integer(field.type)
                or pa.types.is_boolean(field.type) or pa.types.is_dictionary(field.type)):
            continue
        distinct = len(set(metadata.column(name).to_pylist()))
        if 2 <= distinct <= MAX_REPORT_VALUES:
            columns.append(name)
    return columns


def _counts(values: np.ndarray, selected: np.ndarray) -> dict[str, dict[str, int]]:
    archive, picked = Counter(values.tolist()), Counter(values[selected].tolist())
    return {str(k): {"archive": archive[k], "selected": picked.get(k, 0)}
            for k in sorted(archive, key=str)}


def group_recovery(groups: np.ndarray, values: np.ndarray) -> dict:
    """How well found groups recover one known metadata column over the same rows.

    ARI (adjusted Rand index): 1 = the groups are exactly the column's values, 0 = no better
    than chance (slightly negative = worse). NMI (normalized mutual information, 0..1): how
    much knowing an image's group tells about its value, 1 = everything. Both are needed: a
    rare value (a 10% site) found as its own group moves NMI more than ARI. The noise group is
    counted as one group of its own, since the selection draws from it like any other.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    groups, values = np.asarray(groups).astype(str), np.asarray(values).astype(str)
    return {"ari": round(float(adjusted_rand_score(values, groups)), 4),
            "nmi": round(float(normalized_mutual_info_score(values, groups)), 4),
            "rows": int(len(groups))}


def recovery(labels: np.ndarray, point_groups: np.ndarray,
             metadata: dict[str, np.ndarray]) -> dict[str, dict[str, dict]]:
    """``group_recovery`` per class and charted metadata column: do the groups found in a
    class's map stand for a known confounder (site, scanner, sex)? Only columns with at least
    2 distinct values in the class (missing counts as a value); ``split`` is left out, being a
    random assignment of ours rather than a property of the images."""
    out: dict[str, dict[str, dict]] = {}
    for label in sorted(set(labels.tolist()), key=str):
        rows = labels == label
        out[str(label)] = {column: group_recovery(point_groups[rows], values[rows])
                           for column, values in metadata.items()
                           if column != "split" and len(set(values[rows].tolist())) >= 2}
    return out


ALL_CLASSES = "(all classes)"  # the stability key where one grouping spans every class


def grouping_stability(info: dict) -> dict[str, dict]:
    """Per class, the clustering parameter ``find_groups`` chose by stability (``eps_scale``
    for DBSCAN, ``min_cluster_share`` for HDBSCAN) and its stability: the mean adjusted Rand
    index between the groups of subsamples and of all points (1 = every subsample groups the
    same way), with every candidate's for comparison. One ``ALL_CLASSES`` entry where one
    grouping spans every class (``balance_groups``). Classes whose parameter was fixed, or
    chosen otherwise (k-means by silhouette), have no entry: no stability was measured."""
    sources = {ALL_CLASSES: info["map"]} if "map" in info else info.get("classes", {})
    out = {}
    for label, entry in sources.items():
        params = (entry.get("cluster") or {}).get("params") or {}
        name = next((p for p in ("eps_scale", "min_cluster_share") if p in params), None)
        if name is None or "stability" not in params:
            continue
        candidates = params["stability"]
        out[str(label)] = {"parameter": name, "value": params[name],
                           "stability": candidates[str(params[name])], "candidates": candidates}
    return out


def build_summary(config: SelectConfig, labels: np.ndarray, selected: np.ndarray,
                  point_groups: np.ndarray | None, metadata: dict[str, np.ndarray],
                  notes: list[str], strategy_info: dict | None = None) -> dict:
    """Archive vs selection counts per class, per (class, group) and per metadata value; for
    strategies that group a map, also how well the groups recover the metadata columns
    (``recovery``) and how stable the grouping is (``stability``, from the strategy's
    ``strategy_info``), so a reader can judge whether the groups are real confounders."""
    summary = {"strategy": config.strategy, "budget_per_class": config.budget_per_class,
               "seed": config.seed, "images": int(len(labels)), "selected": int(selected.sum()),
               "classes": _counts(labels, selected), "notes": notes}
    if point_groups is not None:
        summary["groups"] = {str(label): _counts(point_groups[labels == label].astype(str),
                                                 selected[labels == label])
                             for label in sorted(set(labels.tolist()), key=str)}
        summary["recovery"] = recovery(labels, point_groups, metadata)
        summary["stability"] = grouping_stability(strategy_info or {})
    summary["metadata"] = {column: _counts(values, selected) for column, values in metadata.items()}
    return summary


def run_selection(config: SelectConfig, workspace: Workspace | None = None) -> dict:
    """Select from an embedding run and publish ``selections/<id>/``; returns the summary."""
    workspace = workspace or Workspace()
    started = utc_now()
    workspace.require("embeddings", config.embedding_run)
    run_record = workspace.provenance("embeddings", config.embedding_run)
    collection = run_record["summary"]["collection"]
    selection_id = config.selection_id or default_selection_id(config, collection)
    workspace.refuse_existing("selections", selection_id, config.overwrite,
                              "--selection-id NEW")
    params = config.strategy_params()
    accepted = strategy_params(config.strategy)
    unused = sorted(set(params) - set(accepted))
    if unused:
        raise MedcurateError(f"strategy {config.strategy} takes no "
                             f"{', '.join('--' + n.replace('_', '-') for n in unused)}")
    if "transform_map" in accepted and backends.backend_name() == "cpu":
        # CPU UMAP transforms in parallel Ray tasks; a cuML model stays on its GPU (serial).
        params["transform_map"] = RayTransformMap()
    clock = time.perf_counter()
    rows, X = load_embeddings(workspace, config.embedding_run)
    timing = {"load_s": round(time.perf_counter() - clock, 3)}
    if config.splits:
        rows, X = _in_splits(rows, X, config.splits)
    manifest = read_manifest(workspace, collection)
    metadata = manifest.take(rows.column("row"))
    missing = [c for c in config.stratify_by if c not in metadata.column_names]
    if missing:
        raise MedcurateError(f"--stratify-by: collection {collection!r} has no column "
                             f"{', '.join(missing)}; columns: {', '.join(metadata.column_names)}")
    labels = np.array(rows.column("label").to_pylist(), dtype=object)
    if config.strategy in POOL_STRATEGIES:  # labels are ignored; the summary counts them
        labels = _values(rows, "label")
    elif any(label is None for label in labels):
        raise MedcurateError(f"collection {collection!r} has unlabeled images; selection keeps a "
                             "budget per class, so every image needs a label")
    labels = labels.astype(str)
    strata = None
    if config.stratify_by:
        parts = [_values(metadata, c) for c in config.stratify_by]
        strata = np.array(["|".join(f"{c}={v}" for c, v in zip(config.stratify_by, values))
                           for values in zip(*parts)], dtype=object)
    clock = time.perf_counter()
    result = select(config.strategy, X, labels, config.budget_per_class, seed=config.seed,
                    strata=strata, min_per_stratum=config.min_per_stratum, **params)
    timing["select_s"] = round(time.perf_counter() - clock, 3)
    chosen = np.asarray(result.indices, dtype=np.int64)
    selected = np.zeros(len(labels), dtype=bool)
    selected[chosen] = True
    chart_columns = report_columns(metadata, config.stratify_by)
    chart_values = {c: _values(metadata, c) for c in chart_columns}
    notes = list(result.info.get("notes", []))
    summary = build_summary(config, labels, selected, result.point_groups, chart_values,
                            notes, result.info)
    summary.update(selection_id=selection_id, embedding_run=config.embedding_run,
                   collection=collection, backend=backends.backend_name(),
                   nodes=params["transform_map"].nodes.as_dict()
                   if "transform_map" in params else {}, timing=timing)
    inputs = [InputRef(role="embedding_run", uri=config.embedding_run,
                       sha256=_digest_outputs(run_record)),
              InputRef(role="collection", uri=collection,
                       sha256=workspace.provenance("collections", collection)
                       ["outputs"][MANIFEST_FILE]["sha256"])]
    if config.fraction is not None:
        summary.update(fraction=config.fraction, pretraining_images=int(selected.sum()))
    if result.synthesis is not None:
        synthetic = synthetic_collection_name(selection_id)
        made = publish_synthetic(workspace, synthetic, result.synthesis, metadata,
                                 selection_id=selection_id, inputs=inputs,
                                 params=config.strategy_params(), overwrite=config.overwrite)
        summary.update(synthetic_collection=synthetic, synthesised=made["ingested"],
                       pretraining_images=int(selected.sum()) + made["ingested"])

    ids = rows.column("id")
    ranks = _ranks_within_class(labels[chosen])
    table = pa.table({
        "id": ids.take(pa.array(chosen)),
        "label": pa.array(labels[chosen].tolist(), pa.string()),
        "split": rows.column("split").take(pa.array(chosen)),
        "group": pa.array(np.asarray(result.group, dtype=np.int64)),
        "rank": pa.array(ranks, pa.int32()),
        "reason": pa.array(list(result.reason), pa.string()),
    })
    for column in config.stratify_by:
        table = table.append_column(column, pa.array(chart_values[column][chosen].tolist(),
                                                     pa.string()))
    with workspace.stage("selections", selection_id, overwrite=config.overwrite) as staging:
        workspace.write_table(f"{staging}/{SELECTION_FILE}", table)
        if result.coords is not None:
            workspace.write_table(f"{staging}/{MAP_FILE}", pa.table({
                "id": ids, "label": pa.array(labels.tolist(), pa.string()),
                "x": pa.array(result.coords[:, 0], pa.float32()),
                "y": pa.array(result.coords[:, 1], pa.float32()),
                "group": pa.array(result.point_groups, pa.int64()),
                "selected": pa.array(selected)}))
        workspace.write_json(f"{staging}/{SUMMARY_FILE}", summary)
        workspace.write_bytes(f"{staging}/{REPORT_FILE}", write_report(
            summary, labels, selected, result.coords, result.point_groups, X,
            title=f"Selection {selection_id}", model=run_record.get("model") or {}))
        record = Provenance(
            kind="selection", key=selection_id, started_at=started,
            config=config.model_dump(), seed=config.seed, model=run_record.get("model"),
            inputs=inputs,
            summary={**{k: v for k, v in summary.items() if k != "metadata"},
                     "strategy_info": _json_ready(result.info)})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return summary


def _in_splits(rows: pa.Table, X: np.ndarray, splits: list[str]) -> tuple[pa.Table, np.ndarray]:
    present = set(rows.column("split").to_pylist())
    unknown = sorted(set(splits) - present)
    if unknown:
        raise MedcurateError(f"--splits: no image is in split {', '.join(unknown)}; splits: "
                             f"{', '.join(sorted(str(s) for s in present))}")
    keep = np.isin(np.array(rows.column("split").to_pylist(), dtype=object), splits)
    return rows.filter(pa.array(keep)), X[keep]


def _ranks_within_class(labels: np.ndarray) -> list[int]:
    seen: Counter = Counter()
    ranks = []
    for label in labels.tolist():
        ranks.append(seen[label])
        seen[label] += 1
    return ranks


def _digest_outputs(record: dict) -> str:
    """One hash over a run's output hashes: changes whenever any shard changes."""
    outputs = record.get("outputs", {})
    text = "\n".join(f"{name}:{outputs[name]['sha256']}" for name in sorted(outputs))
    return hashlib.sha256(text.encode()).hexdigest()


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def read_selection(workspace: Workspace, selection_id: str) -> pa.Table:
    return workspace.read_table(f"{workspace.require('selections', selection_id)}/{SELECTION_FILE}")


def selection_rows(workspace: Workspace, key: str) -> tuple[str, pa.Table]:
    """The selection's collection and the manifest rows of its images."""
    collection = workspace.provenance("selections", key)["summary"]["collection"]
    ids = read_selection(workspace, key).column("id")
    manifest = read_manifest(workspace, collection)
    rows = manifest.filter(pc.is_in(manifest["id"], value_set=ids))
    if rows.num_rows != len(ids):
        raise MedcurateError(f"selection {key!r}: {len(ids) - rows.num_rows} of its ids are not "
                             f"in collection {collection!r} (was it re-ingested?)")
    return collection, rows
