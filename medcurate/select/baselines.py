"""Baseline strategies to compare confounder-aware selection against, with the same
signature ``(X, labels, budget_per_class, *, seed=0, **params) -> SelectionResult``.

Every one but ``random`` works per class (``per_class``). Memory stays O(N·d) (the input)
plus O(N·k) for k-NN graphs: greedy steps keep running vectors of length N and take
distances from faiss for one query row at a time, never an N×N or budget×N matrix.
"""

from __future__ import annotations

import heapq

import numpy as np

from medcurate import backends
from medcurate.reduce import TransformMap
from medcurate.select.base import (ClassPick, SelectionResult, allocate, class_rows,
                                   derive_seed, herd, per_class, run_info, validate_inputs)
from medcurate.select.confounder import (MapStore, class_groups, class_map_seeds,
                                         farthest_first, group_label)


def random_uniform(X, labels, budget_per_class: int, *, seed: int = 0) -> SelectionResult:
    """Uniform random rows over the WHOLE archive, ``budget_per_class × classes`` of them:
    the class mix follows the archive's (rare classes may get few or none)."""
    X, labels = validate_inputs(X, labels, budget_per_class)
    classes = class_rows(labels)
    total = min(budget_per_class * len(classes), len(X))
    indices = np.random.default_rng(derive_seed(seed)).choice(len(X), total, replace=False)
    reasons = [f"class {labels[i]}, uniform random draw {t + 1} of {total} over the archive"
               for t, i in enumerate(indices)]
    per_class_info = {str(label): {"size": len(rows), "taken": int(np.isin(rows, indices).sum())}
                      for label, rows in classes}
    info = run_info("random", seed, budget_per_class, {}, per_class_info,
                    ["random is archive-wide, not per class: per-class counts vary"],
                    total=total)
    return SelectionResult(indices=indices.astype(np.int64),
                           group=np.full(total, -1, dtype=np.int64), reason=reasons, info=info)


def stratified(X, labels, budget_per_class: int, *, seed: int = 0) -> SelectionResult:
    """``budget_per_class`` rows per class, uniformly at random within the class."""
    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        local = np.random.default_rng(class_seed).choice(len(Xc), k, replace=False)
        return ClassPick(indices=local, reason=[f"random draw {t + 1} of {k} within the class"
                                                for t in range(k)])

    return per_class(X, labels, budget_per_class, pick, strategy="stratified", seed=seed,
                     params={})


def kcenter(X, labels, budget_per_class: int, *, seed: int = 0) -> SelectionResult:
    """k-center greedy (Sener & Savarese's core set) per class: start at the point nearest
    the class mean, then repeatedly take the point farthest from every earlier pick. Covers
    the class's extent, outliers first. Deterministic by construction (``seed`` unused)."""
    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        return kcenter_greedy(Xc, k, centre="the class mean")

    return per_class(X, labels, budget_per_class, pick, strategy="kcenter", seed=seed,
                     params={})


def kcenter_greedy(Xc: np.ndarray, k: int, *, centre: str = "the mean") -> ClassPick:
    """``k`` rows of ``Xc`` by k-center greedy (``farthest_first``) from the row nearest the
    mean. ``centre`` names the mean in the first pick's reason."""
    distances = backends.DistancesTo(Xc)
    first = int(np.argmin(distances(Xc.mean(axis=0))))
    picks, gaps = farthest_first(distances, k, first)
    reasons = [f"k-center pick 1 (nearest {centre})"] + [
        f"k-center pick {t} ({gap:.3g} from the nearest earlier pick)"
        for t, gap in enumerate(gaps, 2)]
    return ClassPick(indices=picks, reason=reasons[:k])


def herding(X, labels, budget_per_class: int, *, seed: int = 0) -> SelectionResult:
    """Herding (mean matching, as in iCaRL) per class: each pick is the unpicked point that
    brings the mean of the picks closest to the class mean, so the sample's mean tracks the
    class's and a 10% sub-group gets its share. Deterministic (``seed`` unused)."""
    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        picks, gaps = herd(Xc, k)
        return ClassPick(indices=picks, reason=[
            f"herding pick {t} of {k} (mean of picks {gap:.3g} from the class mean)"
            for t, gap in enumerate(gaps, 1)])

    return per_class(X, labels, budget_per_class, pick, strategy="herding", seed=seed,
                     params={})


def facility_location(X, labels, budget_per_class: int, *, seed: int = 0,
                      n_neighbors: int = 20) -> SelectionResult:
    """Greedy facility location per class: maximise ``Σ_i max_{j∈S} sim(i, j)`` on a sparse
    k-NN graph (faiss, ``n_neighbors`` per point, the point itself included) with Gaussian
    similarities ``exp(−d² / median d²)``. Lazy greedy (Minoux) with a heap; O(N·k) memory.
    Picks are representative of dense regions and spread over all of them. Deterministic
    (``seed`` unused; ties go to the lower row)."""
    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        return _facility_location(Xc, k, n_neighbors)

    return per_class(X, labels, budget_per_class, pick, strategy="facility-location",
                     seed=seed, params={"n_neighbors": n_neighbors})


def _facility_location(Xc: np.ndarray, k: int, n_neighbors: int) -> ClassPick:
    n = len(Xc)
    sq, idx = backends.knn(Xc, min(n_neighbors + 1, n))
    positive = sq[sq > 0]
    scale = float(np.median(positive)) if positive.size else 1.0
    sim = np.exp(-sq / scale)
    # Reverse graph: for candidate j, the points i that have j among their neighbours.
    flat = idx.ravel()
    by_candidate = np.argsort(flat, kind="stable")
    covered_of = by_candidate // idx.shape[1]
    sim_of = sim.ravel()[by_candidate]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=n))])
    coverage = np.zeros(n)

    def gain(j: int) -> float:
        lo, hi = bounds[j], bounds[j + 1]
        return float(np.maximum(sim_of[lo:hi] - coverage[covered_of[lo:hi]], 0.0).sum())

    heap = list(zip((-np.bincount(flat, weights=sim.ravel(), minlength=n)).tolist(), range(n)))
    heapq.heapify(heap)
    picks, reasons = [], []
    while len(picks) < k:
        _, j = heapq.heappop(heap)
        fresh = gain(j)  # gains only shrink (submodularity): a stale bound is an upper bound
        if heap and fresh < -heap[0][0]:
            heapq.heappush(heap, (-fresh, j))
            continue
        lo, hi = bounds[j], bounds[j + 1]
        covered = covered_of[lo:hi]  # distinct: faiss lists a neighbour once per point
        coverage[covered] = np.maximum(coverage[covered], sim_of[lo:hi])
        picks.append(j)
        reasons.append(f"facility-location pick {len(picks)} of {k} (coverage gain "
                       f"{fresh:.3g})")
    return ClassPick(indices=np.asarray(picks), reason=reasons,
                     info={"n_neighbors": n_neighbors, "similarity_scale": scale})


def typicality(X, labels, budget_per_class: int, *, seed: int = 0,
               n_neighbors: int = 20) -> SelectionResult:
    """TypiClust-style per class: k-means into ``budget`` clusters, then from each cluster
    its most typical point, typicality = 1 / mean distance to its ``n_neighbors`` nearest
    neighbours within the cluster (faiss). When k-means returns fewer distinct clusters
    (duplicate points), the most typical remaining points fill the budget."""
    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        clusters = backends.kmeans(k, class_seed).fit_predict(Xc).astype(np.int64)
        spread = np.empty(len(Xc))  # mean k-NN distance: low = typical
        for c in np.unique(clusters):
            members = np.flatnonzero(clusters == c)
            kk = min(n_neighbors, len(members) - 1)
            if kk == 0:
                spread[members] = 0.0
                continue
            sq, _ = backends.knn(Xc[members], kk + 1)
            spread[members] = np.sqrt(sq[:, 1:]).mean(axis=1)
        order = np.lexsort((np.arange(len(Xc)), spread))  # most typical first, then row
        _, first = np.unique(clusters[order], return_index=True)
        best = order[np.sort(first)]
        rest = order[~np.isin(order, best)]
        picks = np.concatenate([best, rest[:k - len(best)]])
        sizes = np.bincount(clusters)
        reasons = [f"most typical of k-means cluster {clusters[i]} ({sizes[clusters[i]]} imgs, "
                   f"mean k-NN distance {spread[i]:.3g})" for i in picks]
        return ClassPick(indices=picks, reason=reasons, group=clusters[picks],
                         info={"n_clusters": k, "n_neighbors": n_neighbors})

    return per_class(X, labels, budget_per_class, pick, strategy="typicality", seed=seed,
                     params={"n_neighbors": n_neighbors})


def cluster_random(X, labels, budget_per_class: int, *, seed: int = 0, pca_dims: int = 50,
                   n_neighbors: int = 15, min_dist: float = 0.1, method: str = "dbscan",
                   cluster_params: dict | None = None, fit_sample: int = 20_000,
                   map_seed: int = 0, transform_map: TransformMap | None = None,
                   map_store: MapStore | None = None) -> SelectionResult:
    """Cluster-stratified random: the confounder-aware groups and budget split (the same
    maps, seeded by ``map_seed``), but uniform random picks within each group, seeded by
    ``seed``. Separates the value of the groups from that of the picks within them."""
    params = {"pca_dims": pca_dims, "n_neighbors": n_neighbors, "min_dist": min_dist,
              "method": method, "cluster_params": cluster_params, "fit_sample": fit_sample,
              "map_seed": map_seed}
    map_seeds = class_map_seeds(map_seed, labels)

    def pick(Xc: np.ndarray, k: int, class_seed: int) -> ClassPick:
        coords, groups, info = class_groups(
            Xc, seed=next(map_seeds), pca_dims=pca_dims, n_neighbors=n_neighbors,
            min_dist=min_dist, method=method, cluster_params=cluster_params,
            fit_sample=fit_sample, transform_map=transform_map, map_store=map_store)
        sizes, noise_group = info["cluster"]["sizes"], info["cluster"]["noise_group"]
        info["allocation"] = allocate(sizes, k, noise_group=noise_group)
        rng = np.random.default_rng(class_seed)
        indices, reasons, picked_groups = [], [], []
        for group, take in enumerate(info["allocation"]):
            members = np.flatnonzero(groups == group)
            indices.append(rng.choice(members, take, replace=False))
            label = group_label(group, len(members), noise_group)
            reasons += [f"{label}, random draw {t + 1} of {take}" for t in range(take)]
            picked_groups.append(np.full(take, group))
        return ClassPick(indices=np.concatenate(indices), reason=reasons,
                         group=np.concatenate(picked_groups), info=info, coords=coords,
                         point_groups=groups)

    return per_class(X, labels, budget_per_class, pick, strategy="cluster-random", seed=seed,
                     params=params)
