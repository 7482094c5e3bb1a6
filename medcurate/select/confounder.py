"""Confounder-aware selection (Ji et al., "Confounder-Aware Medical Data Selection for
Fine-Tuning Pretrained Vision Models").

Per class: embeddings → 2-D map (PCA + UMAP, ``medcurate.reduce``) → groups in the map
(``medcurate.cluster``; each group stands for a hidden sub-group such as a scanner, site or
burned-in tag) → the class budget split over groups in proportion to their size, at least
one per group while the budget allows (``split_budget``) → within each group, points ordered
by distance to the group's centre and picked at evenly spaced distance quantiles, so the
sample keeps the archive's proportions, covers every sub-group, and spans typical to
atypical members of each.

The centre is the group's mean and distances are measured in the 2-D map by default
(``distance_space="map"``): the groups were found there, UMAP keeps each group's local
structure, and in 2-D distances still discriminate (in a 768-d embedding they concentrate:
nearly every point lies at the same distance from the mean). ``distance_space="embedding"``
measures in the embedding instead, for maps too distorted to trust.
"""

from __future__ import annotations

import time

import numpy as np

from medcurate import backends
from medcurate.cluster import find_groups
from medcurate.errors import MedcurateError
from medcurate.reduce import TransformMap, reduce_to_2d
from medcurate.select.base import ClassPick, SelectionResult, per_class, split_budget

WITHIN = ("quantile", "nearest", "farthest")
DISTANCE_SPACES = ("map", "embedding")


def class_groups(Xc: np.ndarray, *, seed: int, pca_dims: int, n_neighbors: int,
                 min_dist: float, method: str, cluster_params: dict | None, fit_sample: int,
                 transform_map: TransformMap | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One class's 2-D map and groups: ``(coords [n, 2], groups [n], info)``; ``info`` keeps
    each stage's parameters and wall seconds, for provenance and the scale benchmark."""
    start = time.perf_counter()
    coords, reduce_info = reduce_to_2d(Xc, pca_dims=pca_dims, n_neighbors=n_neighbors,
                                       min_dist=min_dist, seed=seed, fit_sample=fit_sample,
                                       transform_map=transform_map)
    reduced = time.perf_counter()
    groups, cluster_info = find_groups(coords, method=method, params=cluster_params, seed=seed)
    seconds = {"reduce": round(reduced - start, 3),
               "cluster": round(time.perf_counter() - reduced, 3)}
    return coords, groups, {"reduce": reduce_info, "cluster": cluster_info, "seconds": seconds}


def group_label(group: int, size: int, noise_group: int | None) -> str:
    """``group 2 (41 imgs)``, or ``group 3 (noise, 5 imgs)`` for the noise group."""
    kind = "noise, " if group == noise_group else ""
    return f"group {group} ({kind}{size} imgs)"


def confounder_aware(X, labels, budget_per_class: int, *, seed: int = 0, pca_dims: int = 50,
                     n_neighbors: int = 15, min_dist: float = 0.1, method: str = "dbscan",
                     cluster_params: dict | None = None, within: str = "quantile",
                     distance_space: str = "map", fit_sample: int = 20_000,
                     transform_map: TransformMap | None = None) -> SelectionResult:
    """Select ``budget_per_class`` rows per class that keep the class's sub-group
    proportions and cover every sub-group (see the module docstring).

    ``pca_dims``, ``n_neighbors``, ``min_dist``, ``fit_sample``, ``transform_map``: the 2-D
    map (``reduce_to_2d``); ``method`` and ``cluster_params``: the grouping (``find_groups``;
    parameters left out are chosen automatically). ``within`` orders the picks in a group:
    ``quantile`` (default) takes the points at the mid-points of k equal distance-rank bins,
    typical → atypical; ``nearest`` the k nearest the centre; ``farthest`` farthest-point
    sampling from the point nearest the centre. Deterministic for a ``seed`` (the per-class
    UMAP seed is derived from it). ``coords`` and ``point_groups`` of the result hold every
    row's map position and group.
    """
    _check_choice("within", within, WITHIN)
    _check_choice("distance_space", distance_space, DISTANCE_SPACES)
    params = {"pca_dims": pca_dims, "n_neighbors": n_neighbors, "min_dist": min_dist,
              "method": method, "cluster_params": cluster_params, "within": within,
              "distance_space": distance_space, "fit_sample": fit_sample}

    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        coords, groups, info = class_groups(
            Xc, seed=class_seed, pca_dims=pca_dims, n_neighbors=n_neighbors,
            min_dist=min_dist, method=method, cluster_params=cluster_params,
            fit_sample=fit_sample, transform_map=transform_map)
        space = coords if distance_space == "map" else Xc
        return _pick_in_groups(space, groups, k, info, within, coords)

    return per_class(X, labels, budget_per_class, pick, strategy="confounder-aware", seed=seed,
                     params=params)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MedcurateError(f"unknown {name} {value!r}; known: {', '.join(choices)}")


def _pick_in_groups(space: np.ndarray, groups: np.ndarray, k: int, info: dict, within: str,
                    coords: np.ndarray) -> ClassPick:
    sizes = info["cluster"]["sizes"]
    allocation = split_budget(sizes, k)
    indices, reasons, picked_groups = [], [], []
    for group, take in enumerate(allocation):
        if not take:
            continue
        members = np.flatnonzero(groups == group)
        label = group_label(group, len(members), info["cluster"]["noise_group"])
        local, why = order_within(space[members], take, within)
        indices.append(members[local])
        reasons += [f"{label}, {text}" for text in why]
        picked_groups.append(np.full(take, group))
    info["allocation"] = allocation
    return ClassPick(indices=np.concatenate(indices), reason=reasons,
                     group=np.concatenate(picked_groups), info=info, coords=coords,
                     point_groups=groups)


def order_within(P: np.ndarray, k: int, within: str) -> tuple[np.ndarray, list[str]]:
    """Pick ``k`` of the group's points ``P``; returns their indices and a reason each.

    Distances to the group's mean are ranked (ties by row order). ``quantile``: the ranks
    ``floor((2i + 1) m / 2k)`` for i < k, the mid-points of k equal bins of the m ranks
    (distinct since k ≤ m; k = 1 gives the median distance). ``nearest``: ranks 0..k-1.
    ``farthest``: farthest-point sampling from rank 0, keeping one running min-distance.
    """
    m = len(P)
    sq = backends.sq_dists(P.mean(axis=0, keepdims=True), P)[0]
    order = np.argsort(sq, kind="stable")
    if within == "farthest":
        return _farthest_points(P, k, int(order[0]))
    if within == "nearest":
        ranks = np.arange(k)
        return order[ranks], [f"distance rank {r + 1} of {m} (nearest the centre)"
                              for r in ranks]
    ranks = (2 * np.arange(k) + 1) * m // (2 * k)
    return order[ranks], [f"distance rank {r + 1} of {m} (quantile {(r + 0.5) / m:.2f})"
                          for r in ranks]


def _farthest_points(P: np.ndarray, k: int, start: int) -> tuple[np.ndarray, list[str]]:
    picks = [start]
    nearest = backends.sq_dists(P[start:start + 1], P)[0]
    nearest[start] = -1.0  # never picked again, even among exact duplicates
    reasons = ["farthest-point pick 1 (nearest the centre)"]
    for t in range(1, k):
        new = int(np.argmax(nearest))
        reasons.append(f"farthest-point pick {t + 1} ({np.sqrt(nearest[new]):.3g} from "
                       "earlier picks)")
        picks.append(new)
        nearest = np.minimum(nearest, backends.sq_dists(P[new:new + 1], P)[0])
        nearest[new] = -1.0
    return np.asarray(picks, dtype=np.int64), reasons
