"""Near-duplicate images of an embedding run: groups, which image of each group is kept, and
test images that repeat training images (leaks).

Two images are near-duplicates when the cosine similarity of their embeddings is at least a
threshold; groups are the connected components of that relation, so a chain of near copies
is one group (NeMo Curator's semantic deduplication instead clusters with k-means and compares
pairs within each cluster). Chaining is also why a low threshold loses precision fast: one
pair of distinct images joins two whole groups. The library part is pure:
``near_duplicate_groups`` (arrays in, groups out), ``keep_rule`` (which row of each group stays)
and ``cross_split_leaks``. ``dedup`` is the ``medcurate dedup RUN`` command: load the run,
compute, publish ``dedups/<id>/`` (``groups.parquet``, ``leaks.parquet``, ``summary.json``,
provenance).

Neighbours come from ``backends.knn`` (faiss; faiss-gpu where the GPU backend is active) on
L2-normalised float32 rows, where squared L2 distance and cosine are one number:
``cos = 1 - ‖a - b‖² / 2``. So the ranking is the inner product's, and the same index serves:
exact (flat) up to ``exact_below`` rows, an inverted file above (``4·√N`` lists trained by
k-means on a seeded sample, ``nprobe`` lists searched per query). A near-duplicate sits so
close to its original that it almost always falls in the query's own list, which is why a
small ``nprobe`` finds them; ``tests/test_dedup.py`` checks planted duplicates among 50k rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from medcurate import backends, catalogue
from medcurate.config import DedupConfig
from medcurate.embed import load_embeddings
from medcurate.errors import MedcurateError
from medcurate.ingest import read_manifest
from medcurate.provenance import InputRef, Provenance, json_ready, outputs_digest, utc_now
from medcurate.workspace import MAX_KEY_LENGTH, PROVENANCE_FILE, Workspace

KEEP_RULES = catalogue.DEDUP_KEEP_RULES
GROUPS_FILE = "groups.parquet"  # one row per image in a group
LEAKS_FILE = "leaks.parquet"  # one row per test image that repeats a training image
LEAKS_SCHEMA = pa.schema([("test_id", pa.string()), ("test_split", pa.string()),
                          ("train_id", pa.string()), ("train_split", pa.string()),
                          ("cosine", pa.float32())])
SUMMARY_FILE = "summary.json"
# Splits whose images a model is fitted or tuned on, and splits it is tested on (ingest's names).
TRAIN_SPLITS = ("train", "val")
TEST_SPLITS = ("test",)
EXACT_BELOW = 50_000  # rows up to which the neighbour search is exact (backends' default)
NPROBE = 8  # inverted lists searched per query above it
NEIGHBOURS = 16  # neighbours asked per row at first; rows whose last one still passes ask more
MAX_NEIGHBOURS = 1024  # faiss-gpu allows at most 2048
CHECK_ROWS = 65_536  # rows checked for NaN at a time
# float32 rounding: copies of one image may come out at a cosine of 1 - 6e-8, and threshold 1
# means exact copies
COS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class NearDuplicates:
    """What ``near_duplicate_groups`` found: a group per row and the pairs that made them."""

    group: np.ndarray  # int64 per row: its group (0, 1, ... by first row), -1 where it has none
    pairs: np.ndarray  # int64 [P, 2], i < j: rows found with cosine >= threshold
    cosine: np.ndarray  # float32 [P], the pairs' cosine similarity
    threshold: float
    index: dict  # how the neighbours were searched: kind, and the IVF parameters

    @property
    def groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0

    @property
    def grouped(self) -> int:
        return int((self.group >= 0).sum())


@dataclass(frozen=True)
class Kept:
    """``keep_rule``'s answer, per row of X: whether it is kept, the row kept for its group
    (itself for a kept row and for a row in no group) and its cosine similarity to that row."""

    kept: np.ndarray  # bool
    kept_row: np.ndarray  # int64
    cosine: np.ndarray  # float32; 1 for kept rows

    @property
    def removed(self) -> int:
        return int((~self.kept).sum())


def unit_rows(X, name: str = "X", *, in_place: bool = False) -> np.ndarray:
    """``X`` as C-contiguous float32 rows of length 1, after checking it: 2-D, finite, no
    all-zero row (which has no direction, so no cosine). Rows already of length 1 come back as
    they are; ``in_place`` divides a float32 matrix the caller owns instead of copying it (a
    million 768-d rows are 3 GB). Checked a block of rows at a time, so the check's own
    memory stays small."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] < 1:
        raise MedcurateError(f"{name} must be a 2-D [rows, dims] matrix, not shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise MedcurateError(f"{name} must hold numbers, not {X.dtype}")
    X = backends.as_f32(X)
    norms = np.empty(len(X), np.float32)
    bad = []
    for start in range(0, len(X), CHECK_ROWS):
        block = X[start:start + CHECK_ROWS]
        bad.append(start + np.flatnonzero(~np.isfinite(block).all(axis=1)))
        norms[start:start + len(block)] = np.linalg.norm(block, axis=1)
    bad = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    if len(bad):
        raise MedcurateError(f"{name} has {len(bad)} row(s) with NaN or infinite values "
                             f"(first: row {int(bad[0])}); embed them again")
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise MedcurateError(f"{name} has {len(zero)} all-zero row(s) (first: row "
                             f"{int(zero[0])}): no cosine is defined")
    if not len(X) or np.abs(norms - 1.0).max() <= 1e-5:
        return X
    if in_place and X.flags.writeable:
        X /= norms[:, None]
        return X
    return X / norms[:, None]


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:  # also refuses NaN
        raise MedcurateError(f"threshold {threshold:g} must be a cosine similarity in (0, 1]")
    return threshold


def near_duplicate_groups(X, threshold: float, *, exact_below: int = EXACT_BELOW,
                          nprobe: int = NPROBE, neighbours: int = NEIGHBOURS,
                          seed: int = 0) -> NearDuplicates:
    """Groups of rows of ``X`` whose cosine similarity reaches ``threshold``, as connected
    components of the graph of such pairs.

    Each row asks its ``neighbours`` nearest rows; a row whose farthest answer still passes the
    threshold (a group larger than the question) asks again with 4x as many, up to
    ``MAX_NEIGHBOURS``; beyond that its group is still whole as long as the copies reach each
    other through chains. Exact below ``exact_below`` rows, IVF with ``nprobe`` lists above.
    """
    threshold = check_threshold(threshold)
    unit = unit_rows(X)
    n = len(unit)
    index = _index_description(n, exact_below, nprobe)
    if n < 2:
        return NearDuplicates(np.full(n, -1, np.int64), np.zeros((0, 2), np.int64),
                              np.zeros(0, np.float32), threshold, index)
    rows_i, rows_j, sims = [], [], []
    queries, k = np.arange(n), min(neighbours, n)
    while len(queries):
        index["neighbours"] = int(k)  # the most any row asked
        sq, idx = backends.knn(unit, k, queries=None if len(queries) == n else unit[queries],
                               exact_max=exact_below, nprobe=nprobe, seed=seed)
        cos = 1.0 - sq / 2.0
        hit = (cos >= threshold - COS_TOLERANCE) & (idx >= 0) & (idx != queries[:, None])
        rows_i.append(np.broadcast_to(queries[:, None], idx.shape)[hit])
        rows_j.append(idx[hit])
        sims.append(cos[hit])
        if k >= min(n, MAX_NEIGHBOURS):
            break
        # every answer passed: there may be more (a later round builds the index again)
        queries = queries[cos[:, -1] >= threshold - COS_TOLERANCE]
        k = min(4 * k, n, MAX_NEIGHBOURS)
    pairs, cosine = _unique_pairs(np.concatenate(rows_i), np.concatenate(rows_j),
                                  np.concatenate(sims))
    return NearDuplicates(_components(n, pairs), pairs, cosine, threshold, index)


def _index_description(n: int, exact_below: int, nprobe: int) -> dict:
    if n <= exact_below:
        return {"kind": "exact", "backend": backends.backend_name()}
    # backends._index's inverted file: 4·√N lists, ``nprobe`` of them searched per query
    return {"kind": "ivf-flat", "nlist": int(4 * np.sqrt(n)), "nprobe": int(nprobe),
            "backend": backends.backend_name()}


def _unique_pairs(i: np.ndarray, j: np.ndarray, cos: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each unordered pair once (i < j), with the highest cosine either direction found."""
    pairs = np.column_stack([np.minimum(i, j), np.maximum(i, j)]).astype(np.int64)
    if not len(pairs):
        return pairs.reshape(0, 2), np.zeros(0, np.float32)
    order = np.lexsort((-cos, pairs[:, 1], pairs[:, 0]))
    pairs, cos = pairs[order], cos[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    return pairs[first], np.minimum(cos[first], 1.0).astype(np.float32)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``pairs`` over ``n`` rows: groups numbered in order of their
    first row; -1 for a row in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    size = np.bincount(component)
    group = np.full(n, -1, np.int64)
    member = size[component] > 1
    # renumber the components of more than one row by their first row
    _, first, inverse = np.unique(component[member], return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    group[member] = rank[inverse]
    return group


def keep_rule(X, group: np.ndarray, rule: str = "central", *, sizes=None) -> Kept:
    """Which row of each group stays, by ``rule``:

    - ``central``: the row with the highest mean cosine similarity to its group (the most
      typical copy; computed through the group's summed unit vector, linear in the group size);
    - ``earliest``: the lowest row, i.e. the first ingested;
    - ``largest``: the most pixels in ``sizes`` (one number per row), earliest on a tie.

    Ties (for central: equal to 6 decimals) go to the earliest row. Every other member is
    reported with its cosine to the kept row.
    """
    if rule not in KEEP_RULES:
        raise MedcurateError(f"unknown keep rule {rule!r}; rules: {', '.join(KEEP_RULES)}")
    unit = unit_rows(X)
    group = np.asarray(group, dtype=np.int64)
    n = len(unit)
    if group.shape != (n,):
        raise MedcurateError(f"group has shape {group.shape}; X has {n} rows")
    rows = np.flatnonzero(group >= 0)
    g = group[rows]
    if rule == "central":
        sums = np.zeros((int(g.max()) + 1 if len(g) else 0, unit.shape[1]), np.float64)
        np.add.at(sums, g, unit[rows])
        mean = np.einsum("ij,ij->i", unit[rows], sums[g]) / np.bincount(g)[g]
        score = np.round(mean, 6)  # copies equal up to float rounding tie: earliest wins
    elif rule == "earliest":
        score = np.zeros(len(rows))
    else:
        if sizes is None:
            raise MedcurateError("keep rule 'largest' needs each image's size (pixels)")
        sizes = np.asarray(sizes, dtype=np.float64)
        if sizes.shape != (n,) or not np.isfinite(sizes).all():
            raise MedcurateError(f"sizes must be {n} finite numbers, one per row")
        score = sizes[rows]
    # per group: highest score first, then the earliest row
    order = np.lexsort((rows, -score, g))
    first = np.ones(len(order), dtype=bool)
    first[1:] = g[order][1:] != g[order][:-1]
    kept_of_group = np.empty(int(g.max()) + 1 if len(g) else 0, np.int64)
    kept_of_group[g[order][first]] = rows[order][first]
    kept_row = np.arange(n, dtype=np.int64)
    kept_row[rows] = kept_of_group[g]
    cosine = np.ones(n, np.float32)
    cosine[rows] = np.einsum("ij,ij->i", unit[rows], unit[kept_row[rows]]).clip(-1.0, 1.0)
    kept = kept_row == np.arange(n)
    cosine[kept] = 1.0
    return Kept(kept, kept_row, cosine)


def cross_split_leaks(X, group: np.ndarray, splits, *, train_splits=TRAIN_SPLITS,
                      test_splits=TEST_SPLITS) -> list[dict]:
    """Test rows whose group also holds a training (or validation) row: each with the
    training row it is most similar to, that row's split and their cosine. A model tested on
    them is tested on images it was fitted on. Sorted by test row."""
    unit = unit_rows(X)
    group = np.asarray(group, dtype=np.int64)
    splits = np.asarray([str(s) for s in splits], dtype=object)
    if group.shape != (len(unit),) or splits.shape != (len(unit),):
        raise MedcurateError(f"group and splits need one entry per row of X ({len(unit)})")
    is_test = np.isin(splits, list(test_splits)) & (group >= 0)
    is_train = np.isin(splits, list(train_splits)) & (group >= 0)
    spanning = np.intersect1d(group[is_test], group[is_train])
    members = np.flatnonzero(np.isin(group, spanning) & (is_test | is_train))
    members = members[np.argsort(group[members], kind="stable")]  # by group, then row
    bounds = np.flatnonzero(np.diff(group[members])) + 1
    leaks = []
    for rows in np.split(members, bounds) if len(members) else []:
        train = rows[is_train[rows]]
        for row in rows[is_test[rows]]:
            sims = unit[train] @ unit[row]
            best = int(np.argmax(sims))
            leaks.append({"test_row": int(row), "test_split": str(splits[row]),
                          "train_row": int(train[best]), "train_split": str(splits[train[best]]),
                          "cosine": float(min(sims[best], 1.0))})
    return sorted(leaks, key=lambda leak: leak["test_row"])


def leaks_by_split_pair(leaks: list[dict]) -> dict[str, int]:
    """Leaked test images per ``test~train`` split pair."""
    counts: dict[str, int] = {}
    for leak in leaks:
        pair = f"{leak['test_split']}~{leak['train_split']}"
        counts[pair] = counts.get(pair, 0) + 1
    return dict(sorted(counts.items()))


# -- the command --------------------------------------------------------------------------------
def made_from(record: dict) -> dict:
    """The embedding run a dedup was made from, as its provenance records it (``uri``: the
    run's key, ``sha256``: its outputs' digest); empty where none is recorded."""
    return next((ref for ref in record.get("inputs", []) if ref.get("role") == "embedding_run"),
                {})


def default_dedup_id(config: DedupConfig) -> str:
    """``<run>-dedup-<digest of the settings>``; the run's part is shortened to fit a key."""
    suffix = f"-dedup-{config.digest('dedup_id')}"
    return config.embedding_run[:MAX_KEY_LENGTH - len(suffix)] + suffix


def _sizes(workspace: Workspace, collection: str, rows: pa.Table) -> np.ndarray | None:
    """Pixels per row (width x height from the collection's manifest), None where it has no
    image sizes (a synthetic collection)."""
    manifest = read_manifest(workspace, collection)
    if not {"width", "height"} <= set(manifest.column_names):
        return None
    picked = manifest.select(["width", "height"]).take(rows.column("row"))
    width = picked.column("width").to_numpy(zero_copy_only=False).astype(np.float64)
    height = picked.column("height").to_numpy(zero_copy_only=False).astype(np.float64)
    return np.nan_to_num(width * height, nan=0.0)


def dedup(config: DedupConfig, workspace: Workspace | None = None) -> dict:
    """Find the run's near-duplicates and publish ``dedups/<id>/``; returns the summary."""
    workspace = workspace or Workspace()
    started = utc_now()
    dedup_id = config.dedup_id or default_dedup_id(config)
    workspace.existing("dedups", dedup_id, config.overwrite, "--dedup-id NEW")
    # load
    record = workspace.provenance("embeddings", config.embedding_run)  # NotFound names runs
    collection = record["summary"]["collection"]
    clock = time.perf_counter()
    rows, X = load_embeddings(workspace, config.embedding_run)
    X = unit_rows(X, f"embedding run {config.embedding_run!r}", in_place=True)  # once, here
    sizes = _sizes(workspace, collection, rows) if config.keep == "largest" else None
    if config.keep == "largest" and sizes is None:
        raise MedcurateError(f"--keep largest: collection {collection!r} records no image sizes "
                             "(width, height); use --keep central or earliest")
    timing = {"load_s": round(time.perf_counter() - clock, 3)}
    # compute
    clock = time.perf_counter()
    found = near_duplicate_groups(X, config.threshold)
    kept = keep_rule(X, found.group, config.keep, sizes=sizes)
    splits = np.asarray([str(s) for s in rows.column("split").to_pylist()], dtype=object)
    leaks = cross_split_leaks(X, found.group, splits)
    timing["dedup_s"] = round(time.perf_counter() - clock, 3)
    members = np.flatnonzero(found.group >= 0)
    ids = rows.column("id")
    table = pa.table({
        "id": ids.take(pa.array(members)),
        "split": pa.array(splits[members].tolist(), pa.string()),
        "group": pa.array(found.group[members]),
        "kept": pa.array(kept.kept[members]),
        "kept_id": ids.take(pa.array(kept.kept_row[members])),
        "cosine": pa.array(kept.cosine[members]),
    })
    test_rows = pa.array([leak["test_row"] for leak in leaks], pa.int64())
    train_rows = pa.array([leak["train_row"] for leak in leaks], pa.int64())
    leaked = pa.table({
        "test_id": ids.take(test_rows), "test_split": [x["test_split"] for x in leaks],
        "train_id": ids.take(train_rows), "train_split": [x["train_split"] for x in leaks],
        "cosine": pa.array([x["cosine"] for x in leaks], pa.float32())},
        schema=LEAKS_SCHEMA)
    summary = {"dedup_id": dedup_id, "embedding_run": config.embedding_run,
               "collection": collection, "images": int(len(X)), "groups": found.groups,
               "grouped": found.grouped, "removed": kept.removed,
               "leaks": len(leaks), "leaks_by_split_pair": leaks_by_split_pair(leaks),
               "threshold": config.threshold, "keep": config.keep,
               "index": found.index, "timing": timing}
    # publish
    with workspace.stage("dedups", dedup_id, overwrite=config.overwrite) as staging:
        workspace.write_table(f"{staging}/{GROUPS_FILE}", table)
        workspace.write_table(f"{staging}/{LEAKS_FILE}", leaked)
        workspace.write_json(f"{staging}/{SUMMARY_FILE}", summary)
        provenance = Provenance(
            kind="dedup", key=dedup_id, started_at=started, config=config.model_dump(),
            model=record.get("model"),
            inputs=[InputRef(role="embedding_run", uri=config.embedding_run,
                             sha256=outputs_digest(record)),
                    InputRef(role="collection", uri=collection)],
            summary=json_ready(summary))
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", provenance.model_dump())
    return summary

