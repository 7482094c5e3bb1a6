"""A selection run: embeddings + collection metadata → ``selections/<id>/``, in three steps:
``load`` (the run and its metadata, from the workspace or an ``InputsCache``), ``compute``
(the strategy, the selection table and summary; no selection file is written) and
``publish`` (every file at once through ``Workspace.stage``). ``medcurate.select.pool``
(OptiDEL) shares them.

Writes ``selection.parquet`` (id, label, split, group, rank, reason, strata columns),
``map.parquet`` (every image's 2-D position and group, where the strategy builds a map),
``summary.json`` (archive vs selection counts per class, group and metadata value),
``report.html`` and the provenance sidecar, all published together.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medcurate import backends
from medcurate.config import OptidelConfig, SelectConfig
from medcurate.dedup_use import in_ids, read_dedup
from medcurate.embed import load_embeddings
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.ingest.decode import WINDOW_COLUMNS
from medcurate.ingest.sources import CORE_COLUMNS
from medcurate.provenance import (InputRef, Provenance, input_of, json_ready, outputs_digest,
                                  utc_now)
from medcurate.report import noise_groups, write_report
from medcurate.runtime import NodesSeen, ensure_ray, stage_resources, this_node
from medcurate.select import SelectionResult, select
from medcurate.select.map_store import WorkspaceMaps
from medcurate.thumbnails import thumbnail_uris
from medcurate.workspace import PROVENANCE_FILE, Workspace

SELECTION_FILE = "selection.parquet"
MAP_FILE = "map.parquet"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
MAX_REPORT_VALUES = 20  # metadata columns with more distinct values are not charted
MISSING = "(missing)"


# SelectConfig's OptiDEL fields from when OptiDEL was a select strategy: hashed as unset, so
# selections made before it became its own command keep their ids.
_RETIRED = dict.fromkeys(("fraction", "hard_share", "synth_share", "n_clusters", "extractor",
                          "patch_size", "min_content"))


def default_selection_id(config: SelectConfig | OptidelConfig, collection: str) -> str:
    # Fields added later are left out while unset, so earlier selections keep their ids.
    fields = config.model_dump(exclude={"overwrite"})
    if isinstance(config, SelectConfig):
        fields = {**_RETIRED, **fields}
        for added in config.hashed_when_set:
            if fields[added] is None:
                del fields[added]
        size = f"n{config.budget_per_class}"
    else:
        size = f"f{config.fraction:g}"
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
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
        apply = ray.remote(num_cpus=stage_resources("umap_transform").num_cpus)(
            lambda f, chunk: (this_node(), f(chunk)))
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
        if name in WINDOW_COLUMNS or name not in metadata.column_names:
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
        summary["noise_groups"] = noise_groups(strategy_info or {})
        summary["recovery"] = recovery(labels, point_groups, metadata)
        summary["stability"] = grouping_stability(strategy_info or {})
    summary["metadata"] = {column: _counts(values, selected) for column, values in metadata.items()}
    return summary


@dataclass
class SelectionInputs:
    """An embedding run and its collection's metadata as a selection reads them, prepared
    once: the HTTP service keeps recent ones in memory (``InputsCache``), so a request costs
    the selection, not the read. ``X`` is read-only, as requests share it."""

    run_record: dict
    run_digest: str
    collection: str
    collection_version: str
    manifest_sha256: str
    rows: pa.Table  # id, label, split, row (the manifest row) of each embedding
    X: np.ndarray
    metadata: pa.Table  # the manifest rows of the embeddings, in the same order
    labels: np.ndarray  # str per row; MISSING where unlabeled
    unlabeled: bool
    # where a dedup's removed near-duplicates were left out (``without_duplicates``): the
    # dedup's key, its outputs' digest, how many rows it took out and its figures (report)
    duplicates: dict | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    def values(self, column: str) -> np.ndarray:
        """A metadata column as str per row (MISSING for null), computed once."""
        if ("values", column) not in self._memo:
            self._memo[("values", column)] = _values(self.metadata, column)
        return self._memo[("values", column)]

    def chart_columns(self, stratify_by: list[str]) -> list[str]:
        if ("charts", tuple(stratify_by)) not in self._memo:
            self._memo[("charts", tuple(stratify_by))] = report_columns(self.metadata,
                                                                         stratify_by)
        return self._memo[("charts", tuple(stratify_by))]

    @property
    def nbytes(self) -> int:
        return int(self.X.nbytes + self.rows.nbytes + self.metadata.nbytes + self.labels.nbytes)

    def take(self, keep: np.ndarray, **changes) -> SelectionInputs:
        """A new view of the rows where ``keep`` (bool per row) holds; this one, which an
        ``InputsCache`` may share between requests, is left as it is."""
        positions = pa.array(np.flatnonzero(keep), pa.int64())
        X = self.X[keep]
        X.flags.writeable = False
        rows = self.rows.take(positions)
        return replace(self, rows=rows, X=X, metadata=self.metadata.take(positions),
                       labels=self.labels[keep], unlabeled=rows.column("label").null_count > 0,
                       _memo={}, **changes)


def load_inputs(workspace: Workspace, run_id: str, splits: list[str]) -> SelectionInputs:
    """Read a finished run (only its images in ``splits``, where given) and its metadata."""
    run_record = workspace.provenance("embeddings", run_id)  # NotFound names the known runs
    collection = run_record["summary"]["collection"]
    collection_version = workspace.head("collections", collection)
    rows, X = load_embeddings(workspace, run_id)
    if splits:
        rows, X = _in_splits(rows, X, splits)
    X.flags.writeable = False
    labels = _values(rows, "label").astype(str)  # fixed-width: sorted 6x faster than objects
    return SelectionInputs(
        run_record=run_record,
        run_digest=outputs_digest(run_record), collection=collection,
        collection_version=collection_version.version if collection_version else "",
        manifest_sha256=workspace.provenance("collections", collection)
        ["outputs"][MANIFEST_FILE]["sha256"],
        rows=rows, X=X, metadata=read_manifest(workspace, collection).take(rows.column("row")),
        labels=labels, unlabeled=rows.column("label").null_count > 0)


class InputsCache:
    """Recently used ``SelectionInputs``, bounded by ``max_bytes`` (least recently used out
    first; one larger than the bound is used and not kept).

    Keyed by workspace, run id, the run's live version and the splits, and checked against
    the collection's live version on every hit: an overwritten run or re-ingested collection
    is read afresh, never served stale. Thread-safe; concurrent requests for one missing run
    wait for a single read instead of each reading it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, SelectionInputs] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, workspace: Workspace, run_id: str, splits: list[str]) -> SelectionInputs:
        head = workspace.head("embeddings", run_id)
        if head is None:
            workspace.require("embeddings", run_id)  # raises NotFound, as load_inputs would
        key = (workspace.uri, run_id, head.version, tuple(splits))
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            entry = self._fresh(workspace, key)
            if entry is None:
                entry = load_inputs(workspace, run_id, splits)
                with self._lock:
                    self._keep(key, entry)
        with self._lock:
            self._loading.pop(key, None)
        return entry

    def _fresh(self, workspace: Workspace, key: tuple) -> SelectionInputs | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        collection = workspace.head("collections", entry.collection)
        if collection is None or collection.version != entry.collection_version:
            with self._lock:
                self._entries.pop(key, None)
            return None
        with self._lock:
            self._entries.move_to_end(key)
        return entry

    def _keep(self, key: tuple, entry: SelectionInputs) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        while sum(e.nbytes for e in self._entries.values()) > self.max_bytes:
            self._entries.popitem(last=False)


def load(config: SelectConfig | OptidelConfig, workspace: Workspace,
         inputs: InputsCache | None = None) -> SelectionInputs:
    """The run's images in ``config.splits`` and its collection's metadata: from ``inputs``
    (a cache of read runs: the HTTP service's, or a comparison's), else read now; without
    the near-duplicates that ``config.exclude_duplicates`` removed, where it names a dedup."""
    data = (inputs.get if inputs else load_inputs)(workspace, config.embedding_run,
                                                   config.splits)
    dedup_id = getattr(config, "exclude_duplicates", None)
    return without_duplicates(workspace, data, config.embedding_run, dedup_id) if dedup_id \
        else data


def without_duplicates(workspace: Workspace, data: SelectionInputs, run_id: str,
                       dedup_id: str) -> SelectionInputs:
    """``data`` less the rows that dedup ``dedup_id`` removed (in a group, not its kept
    image), as a new ``SelectionInputs``. The dedup must have been made from this version of
    run ``run_id`` (``read_dedup``). ``duplicates`` keeps its figures for the report."""
    used = read_dedup(workspace, dedup_id, run_id, data.run_digest)
    drop = in_ids(data.rows.column("id"), used.removed)
    return data.take(~drop, duplicates={**used.record(excluded=int(drop.sum())),
                                        "figures": used.figures})


def begin(config: SelectConfig | OptidelConfig, workspace: Workspace,
          inputs: InputsCache | None) -> tuple[SelectionInputs, str, dict]:
    """What every selection command does first: ``load`` the run, name the selection and
    refuse an existing one before any work. Returns the inputs, the key and the timing."""
    clock = time.perf_counter()
    data = load(config, workspace, inputs)
    timing = {"load_s": round(time.perf_counter() - clock, 3)}
    selection_id = config.selection_id or default_selection_id(config, data.collection)
    workspace.existing("selections", selection_id, config.overwrite,
                   "--selection-id NEW")
    return data, selection_id, timing


@dataclass
class Selection:
    """A computed selection, ready to publish; nothing of it is written yet."""

    selection_id: str
    result: SelectionResult
    table: pa.Table  # selection.parquet
    selected: np.ndarray  # bool per input row
    summary: dict
    inputs: list[InputRef]  # what the selection was made from, for provenance


def compute(config: SelectConfig, data: SelectionInputs, selection_id: str, *,
            maps: WorkspaceMaps | None = None, timing: dict | None = None) -> Selection:
    """Run ``config.strategy`` on ``data``: the selection table, map and summary, not yet
    published. ``maps``: where a strategy that draws 2-D maps keeps them (beside the run, so
    selections of any budget or seed share them); None draws them afresh."""
    params = config.strategy_params()  # the config refused any the strategy does not take
    if config.params.draws_maps and backends.backend_name() == "cpu":
        # CPU UMAP transforms in parallel Ray tasks; a cuML model stays on its GPU (serial).
        params["transform_map"] = RayTransformMap()
    if config.params.draws_maps and maps is not None:
        params["map_store"] = maps
    missing = [c for c in config.stratify_by if c not in data.metadata.column_names]
    if missing:
        raise MedcurateError(f"--stratify-by: collection {data.collection!r} has no column "
                             f"{', '.join(missing)}; columns: "
                             f"{', '.join(data.metadata.column_names)}")
    if data.unlabeled:
        raise MedcurateError(f"collection {data.collection!r} has unlabeled images; selection "
                             "keeps a budget per class, so every image needs a label")
    strata = None
    if config.stratify_by:
        parts = [data.values(c) for c in config.stratify_by]
        strata = np.array(["|".join(f"{c}={v}" for c, v in zip(config.stratify_by, values))
                           for values in zip(*parts)], dtype=object)
    timing = dict(timing or {})
    clock = time.perf_counter()
    result = select(config.strategy, data.X, data.labels, config.budget_per_class,
                    seed=config.seed, strata=strata, min_per_stratum=config.min_per_stratum,
                    **params)
    timing["select_s"] = round(time.perf_counter() - clock, 3)
    transform = params.get("transform_map")
    return assemble(config, data, selection_id, result, timing=timing,
                    nodes=transform.nodes.as_dict() if transform else {},
                    maps=maps.as_dict() if "map_store" in params else {})


def assemble(config: SelectConfig | OptidelConfig, data: SelectionInputs, selection_id: str,
             result: SelectionResult, *, timing: dict, nodes: dict | None = None,
             maps: dict | None = None) -> Selection:
    """A strategy's result as the selection table, summary and provenance inputs that every
    selection publishes (``medcurate select`` and ``medcurate optidel`` alike)."""
    maps = maps or {}
    labels = data.labels
    chosen = np.asarray(result.indices, dtype=np.int64)
    selected = np.zeros(len(labels), dtype=bool)
    selected[chosen] = True
    chart_values = {c: data.values(c) for c in data.chart_columns(config.stratify_by)}
    notes = list(result.info.get("notes", []))
    summary = build_summary(config, labels, selected, result.point_groups, chart_values,
                            notes, result.info)
    summary.update(selection_id=selection_id, embedding_run=config.embedding_run,
                   collection=data.collection, backend=backends.backend_name(),
                   nodes=nodes or {}, timing=timing, **({"maps": maps} if maps else {}))
    if data.duplicates is not None:
        summary["duplicates"] = {"dedup_id": data.duplicates["dedup_id"],
                                 "excluded": data.duplicates["excluded"]}
    inputs_used = [InputRef(role="embedding_run", uri=config.embedding_run,
                            sha256=data.run_digest),
                   InputRef(role="collection", uri=data.collection,
                            sha256=data.manifest_sha256),
                   *([InputRef(role="dedup", uri=data.duplicates["dedup_id"],
                               sha256=data.duplicates["sha256"])] if data.duplicates else []),
                   *(InputRef(role="map", uri=key) for key in maps.get("reused", [])
                     + maps.get("computed", []))]
    ids = data.rows.column("id")
    table = pa.table({
        "id": ids.take(pa.array(chosen)),
        "label": pa.array(labels[chosen].tolist(), pa.string()),
        "split": data.rows.column("split").take(pa.array(chosen)),
        "group": pa.array(np.asarray(result.group, dtype=np.int64)),
        "rank": pa.array(_ranks_within_class(labels[chosen]), pa.int32()),
        "reason": pa.array(list(result.reason), pa.string()),
    })
    for column in config.stratify_by:
        table = table.append_column(column, pa.array(chart_values[column][chosen].tolist(),
                                                     pa.string()))
    return Selection(selection_id, result, table, selected, summary, inputs_used)


def publish(workspace: Workspace, config: SelectConfig | OptidelConfig, data: SelectionInputs,
            selection: Selection, *, started: str, report: bool) -> dict:
    """Write ``selections/<id>/`` through the workspace's staging (all files or none);
    returns the summary."""
    result, summary, selected = selection.result, selection.summary, selection.selected
    with workspace.stage("selections", selection.selection_id,
                         overwrite=config.overwrite) as staging:
        workspace.write_table(f"{staging}/{SELECTION_FILE}", selection.table)
        if result.coords is not None:
            workspace.write_table(f"{staging}/{MAP_FILE}", pa.table({
                "id": data.rows.column("id"),
                "label": pa.array(data.labels.tolist(), pa.string()),
                "x": pa.array(result.coords[:, 0], pa.float32()),
                "y": pa.array(result.coords[:, 1], pa.float32()),
                "group": pa.array(result.point_groups, pa.int64()),
                "selected": pa.array(selected)}))
        workspace.write_json(f"{staging}/{SUMMARY_FILE}", summary)
        if report:
            workspace.write_bytes(f"{staging}/{REPORT_FILE}", report_page(
                summary, data, selected, result.coords, result.point_groups,
                selection.selection_id))
        record = Provenance(
            kind="selection", key=selection.selection_id, started_at=started,
            config=config.model_dump(), seed=config.seed, model=data.run_record.get("model"),
            inputs=selection.inputs,
            summary={**{k: v for k, v in summary.items() if k != "metadata"},
                     "strategy_info": json_ready(result.info)})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return summary


def run_selection(config: SelectConfig, workspace: Workspace | None = None, *,
                  inputs: InputsCache | None = None, report: bool = True) -> dict:
    """Select from an embedding run and publish ``selections/<id>/``; returns the summary.

    ``inputs``: a cache of read runs (the HTTP service's); default: read the run. ``report``:
    draw ``report.html`` now (the CLI and jobs); the service publishes without it and draws
    it later with ``render_report``, off the request's path."""
    workspace = workspace or Workspace()
    started = utc_now()
    data, selection_id, timing = begin(config, workspace, inputs)
    maps = WorkspaceMaps(workspace, config.embedding_run, data.run_digest)
    selection = compute(config, data, selection_id, maps=maps, timing=timing)
    return publish(workspace, config, data, selection, started=started, report=report)


def report_page(summary: dict, data: SelectionInputs, selected: np.ndarray,
                coords: np.ndarray | None, groups: np.ndarray | None,
                selection_id: str) -> bytes:
    """``report.html`` of a selection: thumbnails decoded from the collection's own files."""
    def thumbnails(positions: np.ndarray) -> list[str | None]:
        return thumbnail_uris(data.metadata.take(pa.array(positions, pa.int64())))

    return write_report(summary, data.labels, selected, coords, groups, data.X,
                        title=f"Selection {selection_id}", model=data.run_record.get("model") or {},
                        ids=np.asarray(data.rows.column("id").to_pylist(), dtype=object),
                        thumbnails=thumbnails, near_duplicates=near_duplicates(data.duplicates))


def near_duplicates(duplicates: dict | None) -> dict | None:
    """What the report's near-duplicates section shows of the dedup a selection left out:
    its key, its figures and how many rows this selection excluded; None without one."""
    if duplicates is None:
        return None
    return {"dedup_id": duplicates["dedup_id"], "excluded": duplicates["excluded"],
            **duplicates["figures"]}


def has_report(workspace: Workspace, selection_id: str) -> bool:
    return workspace.is_file(workspace.path("selections", selection_id, REPORT_FILE))


def render_report(workspace: Workspace, selection_id: str,
                  inputs: InputsCache | None = None) -> bool:
    """Draw a published selection's ``report.html`` and add it to the selection (a new
    version through the workspace's protocol, ``Workspace.amend``). True once the selection
    has its report; False where the selection was overwritten meanwhile (the new one is
    drawn on its own request). The run must be the one the selection was made from."""
    record = workspace.provenance("selections", selection_id)
    config = SelectConfig.model_validate(record["config"])
    data = load(config, workspace, inputs)
    if input_of(record, "embedding_run").get("sha256") != data.run_digest:
        raise MedcurateError(f"selection {selection_id!r}: embedding run "
                             f"{config.embedding_run!r} was replaced since the selection was "
                             "made, so its report cannot be drawn; select again")
    if data.duplicates and input_of(record, "dedup").get("sha256") != data.duplicates["sha256"]:
        raise MedcurateError(f"selection {selection_id!r}: dedup {config.exclude_duplicates!r} "
                             "was made again since the selection was made, so its report "
                             "cannot be drawn; select again")
    folder = workspace.require("selections", selection_id)
    chosen = workspace.read_table(f"{folder}/{SELECTION_FILE}", columns=["id"]).column("id")
    selected = pc.is_in(data.rows.column("id"), value_set=chosen).to_numpy(zero_copy_only=False)
    coords = groups = None
    if workspace.is_file(f"{folder}/{MAP_FILE}"):
        positions = workspace.read_table(f"{folder}/{MAP_FILE}", columns=["x", "y", "group"])
        coords = np.column_stack([positions.column("x").to_numpy(),
                                  positions.column("y").to_numpy()])
        groups = positions.column("group").to_numpy()
    summary = workspace.read_json(f"{folder}/{SUMMARY_FILE}")
    page = report_page(summary, data, selected, coords, groups, selection_id)
    return workspace.amend("selections", selection_id, {REPORT_FILE: page})


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
