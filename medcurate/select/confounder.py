"""Confounder-aware selection: find each class's hidden sub-groups, keep their proportions,
and pick each group's most typical images first.

Per class: embeddings → 2-D map (PCA + UMAP, ``medcurate.reduce``) → groups in the map
(``medcurate.cluster``; each group stands for a hidden sub-group such as a scanner, site or
burned-in tag; the clustering's parameters are chosen by stability across subsamples) → the
class budget split over groups (``allocate``) → picks within each group.

The default (``confounder-aware``) is built to beat the representative-seeking baselines at
small budgets and to cover rare groups they miss at larger ones:

- allocation ``share``: proportional to group size; a group is guaranteed a pick only where
  it earns at least half a pick by its size, and the DBSCAN noise group never by guarantee,
  so the main mode keeps its share at N = 5;
- within each group, ``herding`` in the embedding: the first pick is the image nearest the
  group's mean (its most typical), and later picks spread out only as far as matching the
  group's mean needs, so a group with one pick is represented by its most typical member and
  a large group's picks widen toward its extent as its share grows.

``balance_groups=True`` is for archives where a confounder is correlated with the label
(a site that sends mostly one diagnosis): the groups are found once over all classes and each
class's budget is split by the archive-wide group shares, so every class gets the same mix of
groups instead of copying the archive's correlation into the training set.

``confounder-aware-paper`` is Ji et al.'s method as published ("Confounder-Aware Medical Data
Selection for Fine-Tuning Pretrained Vision Models"): every group, noise included, one pick
while the budget allows (largest first), and within a group the images at the mid-points of
k equal distance-rank bins from the group's centre in the 2-D map (``quantile-mid``; with
one pick, the median-distance image). The study compares both.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from medcurate import backends
from medcurate.cluster import find_groups
from medcurate.errors import MedcurateError
from medcurate.reduce import TransformMap, reduce_to_2d
from medcurate.select.base import (ALLOCATIONS, ClassPick, Gather, SelectionResult, allocate,
                                   allocate_by_shares, class_rows, derive_seed, herd,
                                   per_class, run_info, small_class_note, validate_inputs)

WITHIN = ("herding", "quantile", "quantile-mid", "nearest", "farthest")
DISTANCE_SPACES = ("map", "embedding")


ClassMap = tuple[np.ndarray, np.ndarray, dict]  # coords [n, 2], groups [n], info
# ``store(Xc, params, compute)``: the map ``compute()`` makes of ``Xc`` with ``params`` (its
# seed among them), from a store where it was made before, else computed and kept.
MapStore = Callable[[np.ndarray, dict, Callable[[], ClassMap]], ClassMap]


def class_groups(Xc: np.ndarray, *, seed: int, pca_dims: int, n_neighbors: int,
                 min_dist: float, method: str, cluster_params: dict | None, fit_sample: int,
                 transform_map: TransformMap | None,
                 map_store: MapStore | None = None) -> ClassMap:
    """One class's 2-D map and groups: ``(coords [n, 2], groups [n], info)``; ``info`` keeps
    each stage's parameters and wall seconds, for provenance and the scale benchmark.

    The map depends only on the rows, the parameters and the seed, so a ``map_store`` may
    return one made before (a second selection with another budget skips UMAP)."""
    params = {"seed": seed, "pca_dims": pca_dims, "n_neighbors": n_neighbors,
              "min_dist": min_dist, "method": method, "cluster_params": cluster_params,
              "fit_sample": fit_sample}

    def compute() -> ClassMap:
        return _map_and_groups(Xc, transform_map=transform_map, **params)

    return compute() if map_store is None else map_store(Xc, params, compute)


def _map_and_groups(Xc: np.ndarray, *, seed: int, pca_dims: int, n_neighbors: int,
                    min_dist: float, method: str, cluster_params: dict | None, fit_sample: int,
                    transform_map: TransformMap | None) -> ClassMap:
    start = time.perf_counter()
    coords, reduce_info = reduce_to_2d(Xc, pca_dims=pca_dims, n_neighbors=n_neighbors,
                                       min_dist=min_dist, seed=seed, fit_sample=fit_sample,
                                       transform_map=transform_map)
    reduced = time.perf_counter()
    groups, cluster_info = find_groups(coords, method=method, params=cluster_params, seed=seed)
    seconds = {"reduce": round(reduced - start, 3),
               "cluster": round(time.perf_counter() - reduced, 3)}
    return coords, groups, {"map_seed": seed, "reduce": reduce_info, "cluster": cluster_info,
                            "seconds": seconds}


def group_label(group: int, size: int, noise_group: int | None) -> str:
    """``group 2 (41 imgs)``, or ``group 3 (noise, 5 imgs)`` for the noise group."""
    kind = "noise, " if group == noise_group else ""
    return f"group {group} ({kind}{size} imgs)"


def confounder_aware(X, labels, budget_per_class: int, *, seed: int = 0, pca_dims: int = 50,
                     n_neighbors: int = 15, min_dist: float = 0.1, method: str = "dbscan",
                     cluster_params: dict | None = None, within: str = "herding",
                     distance_space: str = "embedding", allocation: str = "share",
                     balance_groups: bool = False, fit_sample: int = 20_000,
                     map_seed: int = 0, transform_map: TransformMap | None = None,
                     map_store: MapStore | None = None) -> SelectionResult:
    """Select ``budget_per_class`` rows per class that keep the class's sub-group
    proportions, cover the sub-groups that earn a pick, and start each group at its most
    typical image (see the module docstring).

    ``pca_dims``, ``n_neighbors``, ``min_dist``, ``fit_sample``, ``transform_map``: the 2-D
    map (``reduce_to_2d``); ``method`` and ``cluster_params``: the grouping (``find_groups``;
    parameters left out are chosen automatically). ``allocation``: ``share`` or ``paper``
    (``allocate``). ``within`` orders the picks in a group, measured in ``distance_space``
    (``embedding`` or the 2-D ``map``): ``herding`` (default) mean matching from the most
    typical image; ``quantile`` the ranks ``i·m/k`` of the distances to the group's centre
    (the most central first, then evenly toward the rim); ``quantile-mid`` the mid-points of
    k equal rank bins (the paper's); ``nearest`` the k nearest the centre; ``farthest``
    farthest-point sampling from the one nearest the centre. ``balance_groups``: one
    grouping over all classes and every class split by the archive-wide group shares
    (``allocate_by_shares``: ``allocation`` does not apply, and the noise group gets its
    archive-wide share like any other group, since a share is what balancing matches).
    ``map_seed`` seeds the maps (one per class, derived from it and the label), not
    ``seed``: a map describes the archive, so selections of any budget and seed share it, the
    report's map stays put, and a ``map_store`` serves it to them without another UMAP; vary
    ``map_seed`` to see the spread over maps. Deterministic for a ``map_seed`` (and ``seed``,
    for what draws at random). ``coords`` and ``point_groups`` of the result hold every row's
    map position and group.
    """
    return _confounder_aware("confounder-aware", X, labels, budget_per_class, seed=seed,
                             pca_dims=pca_dims, n_neighbors=n_neighbors, min_dist=min_dist,
                             method=method, cluster_params=cluster_params, within=within,
                             distance_space=distance_space, allocation=allocation,
                             balance_groups=balance_groups, fit_sample=fit_sample,
                             map_seed=map_seed, transform_map=transform_map,
                             map_store=map_store)


def confounder_aware_paper(X, labels, budget_per_class: int, *, seed: int = 0,
                           pca_dims: int = 50, n_neighbors: int = 15, min_dist: float = 0.1,
                           method: str = "dbscan", cluster_params: dict | None = None,
                           fit_sample: int = 20_000, map_seed: int = 0,
                           transform_map: TransformMap | None = None,
                           map_store: MapStore | None = None) -> SelectionResult:
    """Ji et al.'s confounder-aware selection as published: the same map and groups, the
    ``paper`` allocation (one pick per group while the budget allows, noise included) and
    ``quantile-mid`` picks in the 2-D map."""
    return _confounder_aware("confounder-aware-paper", X, labels, budget_per_class, seed=seed,
                             pca_dims=pca_dims, n_neighbors=n_neighbors, min_dist=min_dist,
                             method=method, cluster_params=cluster_params,
                             within="quantile-mid", distance_space="map", allocation="paper",
                             balance_groups=False, fit_sample=fit_sample,
                             map_seed=map_seed, transform_map=transform_map,
                             map_store=map_store)


def _confounder_aware(strategy: str, X, labels, budget_per_class: int, *, seed: int,
                      within: str, distance_space: str, allocation: str, balance_groups: bool,
                      **map_params) -> SelectionResult:
    _check_choice("within", within, WITHIN)
    _check_choice("distance_space", distance_space, DISTANCE_SPACES)
    _check_choice("allocation", allocation, ALLOCATIONS)
    map_seed = map_params.pop("map_seed")
    params = {**{k: v for k, v in map_params.items() if k not in RUNTIME_PARAMS},
              "within": within, "distance_space": distance_space, "allocation": allocation,
              "balance_groups": balance_groups, "map_seed": map_seed}
    if balance_groups:
        return _balanced(strategy, X, labels, budget_per_class, seed=seed, map_seed=map_seed,
                         within=within, distance_space=distance_space, params=params,
                         map_params=map_params)
    map_seeds = class_map_seeds(map_seed, labels)

    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        coords, groups, info = class_groups(Xc, seed=next(map_seeds), **map_params)
        space = coords if distance_space == "map" else Xc
        info["allocation"] = allocate(info["cluster"]["sizes"], k, rule=allocation,
                                      noise_group=info["cluster"]["noise_group"])
        indices, group, reasons = _pick_in_groups(space, groups, info["allocation"], within,
                                                  info["cluster"]["noise_group"])
        return ClassPick(indices=indices, reason=reasons, group=group, info=info,
                         coords=coords, point_groups=groups)

    return per_class(X, labels, budget_per_class, pick, strategy=strategy, seed=seed,
                     params=params)


RUNTIME_PARAMS = ("transform_map", "map_store")  # how to run, not what to compute


def class_map_seeds(map_seed: int, labels):
    """The seed of each class's map, in the order ``per_class`` visits the classes (sorted
    labels): derived from ``map_seed`` and the label, so a class keeps its map whatever the
    selection's own seed."""
    return iter([derive_seed(map_seed, label) for label, _ in class_rows(np.asarray(labels))])


def _balanced(strategy: str, X, labels, budget_per_class: int, *, seed: int, map_seed: int,
              within: str, distance_space: str, params: dict,
              map_params: dict) -> SelectionResult:
    """One map and grouping over every class; each class's budget split by the groups'
    archive-wide shares, capped by what the class holds of each group."""
    X, labels = validate_inputs(X, labels, budget_per_class)
    map_seed = derive_seed(map_seed, "all classes")
    coords, groups, map_info = class_groups(X, seed=map_seed, **map_params)
    sizes = np.asarray(map_info["cluster"]["sizes"])
    shares = sizes / sizes.sum()
    noise_group = map_info["cluster"]["noise_group"]
    space = coords if distance_space == "map" else X
    gather, classes, notes = Gather(len(X)), {}, []
    for label, rows in class_rows(labels):
        k = min(budget_per_class, len(rows))
        capacity = np.bincount(groups[rows], minlength=len(sizes))
        alloc = allocate_by_shares(shares, capacity, k)
        indices, group, reasons = _pick_in_groups(space[rows], groups[rows], alloc, within,
                                                  noise_group)
        gather.add(rows, indices, group, reasons, f"class {label}, ", coords[rows],
                   groups[rows])
        classes[str(label)] = {"size": len(rows), "budget": budget_per_class, "taken": k,
                               "group_sizes": capacity.tolist(), "allocation": alloc}
        if len(rows) < budget_per_class:
            notes.append(small_class_note(label, len(rows), budget_per_class))
    notes.append("balance_groups: one map and grouping over all classes; each class split "
                 "by the archive-wide group shares")
    return gather.result(run_info(strategy, seed, budget_per_class, params, classes, notes,
                                  map={**map_info, "seed": map_seed,
                                       "shares": [round(float(x), 4) for x in shares]}))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MedcurateError(f"unknown {name} {value!r}; known: {', '.join(choices)}")


def _pick_in_groups(space: np.ndarray, groups: np.ndarray, allocation: list[int], within: str,
                    noise_group: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``allocation[g]`` picks from each group ``g``: (indices, their groups, reasons)."""
    indices, reasons, picked_groups = [], [], []
    for group, take in enumerate(allocation):
        if not take:
            continue
        members = np.flatnonzero(groups == group)
        label = group_label(group, len(members), noise_group)
        local, why = order_within(space[members], take, within)
        indices.append(members[local])
        reasons += [f"{label}, {text}" for text in why]
        picked_groups.append(np.full(take, group))
    return np.concatenate(indices), np.concatenate(picked_groups), reasons


def order_within(P: np.ndarray, k: int, within: str) -> tuple[np.ndarray, list[str]]:
    """Pick ``k`` of the group's points ``P``; returns their indices and a reason each.

    ``herding``: mean matching from the point nearest the mean (``herd``). The others rank
    distances to the group's mean (ties by row order): ``quantile`` the ranks
    ``floor(i m / k)`` for i < k (rank 0, the most central, first; distinct since k ≤ m);
    ``quantile-mid`` the mid-points ``floor((2i + 1) m / 2k)`` of k equal bins (k = 1 gives
    the median distance); ``nearest`` ranks 0..k-1; ``farthest`` farthest-point sampling
    from rank 0, keeping one running min-distance.
    """
    m = len(P)
    if within == "herding":
        picks, gaps = herd(P, k)
        return picks, [f"herding pick {t} of {k} (mean of picks {gap:.3g} from the group's)"
                       for t, gap in enumerate(gaps, 1)]
    sq = backends.sq_dists(P.mean(axis=0, keepdims=True), P)[0]
    order = np.argsort(sq, kind="stable")
    if within == "farthest":
        picks, gaps = farthest_first(backends.DistancesTo(P), k, int(order[0]))
        return picks, ["farthest-point pick 1 (nearest the centre)"] + [
            f"farthest-point pick {t} ({gap:.3g} from earlier picks)"
            for t, gap in enumerate(gaps, 2)]
    if within == "nearest":
        ranks = np.arange(k)
        return order[ranks], [f"distance rank {r + 1} of {m} (nearest the centre)"
                              for r in ranks]
    ranks = np.arange(k) * m // k if within == "quantile" else (2 * np.arange(k) + 1) * m // (2 * k)
    return order[ranks], [f"distance rank {r + 1} of {m} (quantile {(r + 0.5) / m:.2f})"
                          for r in ranks]


def farthest_first(distances: backends.DistancesTo, k: int,
                   start: int) -> tuple[np.ndarray, np.ndarray]:
    """k-center greedy (farthest-first traversal) over the rows ``distances`` measures: pick
    ``start``, then each time the row farthest from every earlier pick. Returns the ``k``
    picks and each later pick's distance to its nearest earlier one (``k - 1`` values), for
    the callers' reasons. One running min-distance vector: O(N) memory. The one routine of
    the ``kcenter`` strategy, OptiDEL's diversity step and ``within="farthest"``."""
    picks, gaps = [start], []
    nearest = distances(distances.X[start])
    nearest[start] = -1.0  # never picked again, even among exact duplicates
    for _ in range(1, k):
        new = int(np.argmax(nearest))
        gaps.append(np.sqrt(nearest[new]))
        picks.append(new)
        nearest = np.minimum(nearest, distances(distances.X[new]))
        nearest[new] = -1.0
    return np.asarray(picks[:k], dtype=np.int64), np.asarray(gaps, dtype=np.float32)
