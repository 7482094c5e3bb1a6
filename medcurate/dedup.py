"""Near-duplicate images of an embedding run: groups, which image of each group is kept, and
test images that repeat training images (leaks).

Two images are near-duplicates when the cosine similarity of their embeddings is at least a
threshold; groups are the connected components of that relation, so a chain of near copies
is one group (NeMo Curator's semantic deduplication instead keeps pairs within each k-means
cluster apart). Chaining is also why a low threshold loses precision fast: one
pair of distinct images joins two whole groups. The library part is pure:
``near_duplicate_groups`` (arrays in, groups out), ``keep_rule`` (which row of each group stays)
and ``cross_split_leaks``. ``dedup`` is the ``medcurate dedup RUN`` command: load the run,
compute, publish ``dedups/<id>/`` (``groups.parquet``, ``leaks.parquet``, ``summary.json``,
provenance).

Pairs are found on L2-normalised float32 rows, where the inner product is the cosine, as
blocks of one matrix product each (``backends.similar_pairs``: BLAS, or cupy on the GPU
backend), kept where they reach the threshold: a range search, so every pair above it is
found, not a fixed number of neighbours per row. Up to ``exact_below`` rows every row is
compared with every row. Above, as in NeMo Curator, k-means lists first (``4·√N`` centres
from faiss, faiss-gpu on the GPU backend, trained a few rounds on a small seeded sample), then
pairs only within lists: each row is compared with the members of its ``probes`` nearest
lists. Lists and candidates are found in the rows' 256 leading principal dimensions (a
projection only shortens distances, so it loses no pair) and each candidate is checked on the
full rows. A near copy sits so close to its original that one of those lists almost always holds
it: ``bench/dedup_scale.py`` measures how often at a million rows, ``tests/test_dedup.py``
checks planted copies among 50k.
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
EXACT_BELOW = 50_000  # rows up to which every pair is compared
PROBES = 8  # lists each row is compared in above it (recall 0.99 at 1M: bench/dedup_scale.py)
TRAIN_PER_LIST = 16  # k-means sample: rows a list
TRAIN_ITERATIONS = 6  # k-means rounds
REDUCED_DIMS = 256  # dimensions the lists are made and candidates found in, above EXACT_BELOW
PROJECTION_SAMPLE = 20_000  # rows the principal directions are computed from
MAX_NEIGHBOURS = 1024  # near copies kept per row (more only repeat a group's links)
BLOCK_CELLS = 1 << 24  # similarities computed at once (64 MB of float32)
VERIFY_ROWS = 16_384  # candidate pairs checked on the full rows at once
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
    index: dict  # how pairs were searched: kind (exact or lists) and the lists' parameters

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
                          probes: int = PROBES, dims: int = REDUCED_DIMS,
                          seed: int = 0) -> NearDuplicates:
    """Groups of rows of ``X`` whose cosine similarity reaches ``threshold``, as connected
    components of the graph of such pairs.

    Up to ``exact_below`` rows every pair is compared. Above, the rows are partitioned into
    k-means lists in their ``dims`` leading principal dimensions (``partition``) and each row
    is compared with the rows of the ``probes`` lists whose centres are nearest to it: a near
    copy sits so close to its original that it almost always falls in one of them (measured in
    ``bench/dedup_scale.py``).
    """
    threshold = check_threshold(threshold)
    unit = unit_rows(X)
    n = len(unit)
    if n <= exact_below:
        everything = np.arange(n)
        search, members, probers = unit, [everything], [everything]
        index = {"kind": "exact", "backend": backends.backend_name()}
    else:
        if probes < 1:
            raise MedcurateError(f"probes must be at least 1, not {probes}")
        search = principal_projection(unit, dims, sample=PROJECTION_SAMPLE, seed=seed)
        members, probers, index = partition(search, probes, seed)
    found = [pairs_at_least(unit, search, rows, queries, threshold)
             for rows, queries in zip(members, probers)]
    pairs, cosine = _unique_pairs(*(np.concatenate(part) for part in zip(*found)))
    return NearDuplicates(connected_groups(n, pairs), pairs, cosine, threshold, index)


def principal_projection(unit: np.ndarray, dims: int, *, sample: int, seed: int) -> np.ndarray:
    """The rows of ``unit`` projected on the ``dims`` principal directions of a seeded sample
    of ``sample`` rows (float32 [N, dims]); ``unit`` itself where it has no more columns.
    An orthogonal projection only shortens distances, so two rows within a distance there are
    candidates and no pair within it in full is lost; the leading directions keep most of the
    distance between rows that are not copies, so few candidates are not pairs. Searching in
    256 instead of 768 dimensions makes the lists' centres, the assignment and the candidate
    products three times cheaper."""
    n, d = unit.shape
    if d <= dims:
        return unit
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))
    drawn = unit[rows] - unit[rows].mean(axis=0)
    basis = np.ascontiguousarray(np.linalg.svd(drawn, full_matrices=False)[2][:dims].T)
    projected = np.empty((n, dims), np.float32)
    for start in range(0, n, CHECK_ROWS):
        projected[start:start + CHECK_ROWS] = unit[start:start + CHECK_ROWS] @ basis
    return projected


def partition(search: np.ndarray, probes: int, seed: int
              ) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Lists of rows to compare: per list, its member rows and the rows that look for their
    near copies in it (its probers). ``lists_for(N)`` k-means lists of the rows of ``search``
    (centres trained on a seeded sample of ``TRAIN_PER_LIST`` rows a list, in
    ``TRAIN_ITERATIONS`` rounds): each row is a member of its nearest centre's list and probes
    its ``probes`` nearest centres' lists. Returns the lists and how they were made (the
    dedup's summary records it)."""
    n = len(search)
    lists = lists_for(n)
    centres = backends.kmeans_centres(search, lists, sample=TRAIN_PER_LIST * lists,
                                      iterations=TRAIN_ITERATIONS, seed=seed)
    probes = min(probes, lists)
    _, nearest = backends.knn(centres, probes, queries=search)  # [n, probes], nearest first
    members = _rows_by_list(nearest[:, 0], lists)
    probers = _rows_by_list(nearest.ravel(), lists, rows=np.repeat(np.arange(n), probes))
    return members, probers, {"kind": "lists", "lists": lists, "probes": probes,
                              "dims": int(search.shape[1]),
                              "train_rows": min(n, TRAIN_PER_LIST * lists),
                              "backend": backends.backend_name()}


def lists_for(n: int) -> int:
    """k-means lists for ``n`` rows: ``4·√N`` (faiss's rule of thumb for inverted files; 4,000
    at a million rows, 250 rows a list on average)."""
    return max(1, int(4 * np.sqrt(n)))


def _rows_by_list(list_of: np.ndarray, lists: int, rows: np.ndarray | None = None
                  ) -> list[np.ndarray]:
    """``rows`` (default: 0..len-1) split by ``list_of``, ascending within each list."""
    order = np.argsort(list_of, kind="stable")
    bounds = np.searchsorted(list_of[order], np.arange(lists + 1))
    rows = order if rows is None else rows[order]
    return [rows[bounds[i]:bounds[i + 1]] for i in range(lists)]


def pairs_at_least(unit: np.ndarray, search: np.ndarray, rows: np.ndarray,
                   queries: np.ndarray, threshold: float, *, cap: int = MAX_NEIGHBOURS
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (query, row) of distinct rows with cosine >= ``threshold``, as three arrays
    (query rows, member rows, cosine).

    Candidates are the pairs whose rows in ``search`` (``unit`` or its ``principal_projection``)
    lie within the distance that the threshold allows between unit rows, ``√(2 - 2·t)``; each
    is then checked on the full rows. Queries go a block at a time so the block of products
    stays under ``BLOCK_CELLS``; a query with more than ``cap`` pairs keeps its ``cap`` most
    similar (a group of thousands of copies is still one group, linked through them, without
    millions of pairs)."""
    block = max(1, BLOCK_CELLS // max(1, len(rows)))
    members = _with_norms(search[rows], query=False)
    # -|a - b|^2 / 2 >= -(2 - 2t) / 2, with room for float32 rounding
    at_least = -(1.0 - threshold) - 10 * COS_TOLERANCE
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    for start in range(0, len(queries), block):
        q = queries[start:start + block]
        qi, ri, _ = backends.similar_pairs(_with_norms(search[q], query=True), members,
                                           at_least)
        qi, ri = q[qi], rows[ri]
        cos = _cosines(unit, qi, ri)
        keep = (qi != ri) & (cos >= threshold - COS_TOLERANCE)
        qi, ri, cos = qi[keep], ri[keep], cos[keep]
        if len(qi) and np.unique(qi, return_counts=True)[1].max() > cap:
            order = np.lexsort((-cos, qi))  # per query, most similar first
            rank = np.arange(len(order)) - np.searchsorted(qi[order], qi[order])
            order = order[rank < cap]
            qi, ri, cos = qi[order], ri[order], cos[order]
        parts.append((qi, ri, cos.astype(np.float32)))
    return tuple(np.concatenate(column) for column in zip(*parts))


def _cosines(unit: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of rows (``unit[a[i]]``, ``unit[b[i]]``), ``VERIFY_ROWS`` pairs at a
    time: a look-alike archive at a low threshold has millions of candidates, and gathering
    all their rows at once would need their full size twice over (tens of GB)."""
    cos = np.empty(len(a), np.float32)
    for start in range(0, len(a), VERIFY_ROWS):
        part = slice(start, start + VERIFY_ROWS)
        cos[part] = np.einsum("ij,ij->i", unit[a[part]], unit[b[part]])
    return cos


def _with_norms(rows: np.ndarray, *, query: bool) -> np.ndarray:
    """``rows`` with two columns more, so that a query's product with a member is
    ``-|query - member|^2 / 2``: ``[q, -|q|^2/2, 1]`` for queries, ``[m, 1, -|m|^2/2]`` for
    members. One matrix product then ranks by distance in a space whose rows are not unit."""
    half_sq = -0.5 * np.einsum("ij,ij->i", rows, rows)[:, None]
    ones = np.ones_like(half_sq)
    return np.hstack([rows, half_sq, ones] if query else [rows, ones, half_sq]).astype(np.float32)


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


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The connected component of each of ``n`` rows under ``pairs`` [P, 2] (scipy's
    numbering; a row in no pair is a component of its own)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``pairs`` over ``n`` rows: groups numbered in order of their
    first row; -1 for a row in no pair."""
    component = components(n, pairs)
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

