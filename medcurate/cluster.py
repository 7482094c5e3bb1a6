"""Groups within one class's 2-D map: each group stands for a hidden sub-group (confounder).

The paper tunes DBSCAN by hand; here every parameter left out is chosen from the data by a
documented rule and recorded in ``info`` so provenance can explain the grouping:

- ``min_samples`` (DBSCAN and HDBSCAN) = ``max(4, round(ln N))``: 4 = 2 × the map's 2
  dimensions (the usual DBSCAN rule of thumb), growing slowly with N so that large classes
  need denser cores and stray points become noise rather than tiny clusters.
- DBSCAN ``eps`` = a scale × the knee of the sorted k-distance curve (k = ``min_samples``
  counting the point itself, as DBSCAN does). The knee is the point farthest below the chord
  from the first to the last point after scaling both axes to [0, 1]: the k-distance of a
  cluster's typical point, where the curve turns up into the sparse tail. The knee alone cuts
  a cluster's sparser rim off as noise and splits small groups into crumbs (adjusted Rand
  0.72–0.87 against planted groups); twice the knee recovered them (1.0). The scale is chosen
  from ``EPS_SCALES`` by stability: each candidate clusters ``STABILITY_ROUNDS`` seeded
  subsamples of ``STABILITY_FRACTION`` of the points (of at most ``stability_sample`` points,
  so a million-point class costs what 20,000 do) and is scored by the mean adjusted Rand
  index between each subsample's groups and the groups of all the points (a subsample's eps
  grows as 1 / sqrt(its share), as neighbour distances do in 2-D). The finest grouping
  (smallest scale) whose stability reaches ``STABLE_ARI`` (0.99) wins, else the most stable
  one: every grouping into one blob is perfectly stable, so "most stable" alone would always
  merge. The bar is high because a knee-sized eps that sheds each cluster's rim as noise is
  itself fairly stable (0.94–0.99 on planted blobs, where it matched the planted groups at
  only 0.80–0.94 ARI); at 0.99 the chosen scale matched them at 0.97–1.0 on six planted
  layouts. On HAM10000's MobileNetV2 maps every class is one stable blob (no DBSCAN-separable
  sub-group). The curve is estimated from up to ``knee_sample`` seeded query points.
- HDBSCAN ``min_cluster_size``: the same rule over ``MIN_CLUSTER_SHARES`` of the class (1%,
  2%, 4%, at least 5 points): a group must hold a stable share of its class, which keeps the
  hierarchy from splitting one blob into crumbs, yet lets a 10% confounder stand on its own;
  a single cluster is allowed, so a class without sub-groups is one group (HDBSCAN then calls
  a blob's sparse rim noise: that rim is the noise group).
- k-means ``n_clusters`` = the k in ``2..8`` with the best silhouette on up to
  ``silhouette_sample`` seeded points; when even the best is under ``min_silhouette`` (0.5,
  Kaufman & Rousseeuw's threshold for "reasonable structure") the class is one group.
"""

from __future__ import annotations

import math

import numpy as np

from medcurate import backends
from medcurate.errors import MedcurateError

METHODS = ("dbscan", "hdbscan", "kmeans")
EPS_SCALES = (1.0, 1.5, 2.0, 3.0)
MIN_CLUSTER_SHARES = (0.01, 0.02, 0.04)
STABILITY_ROUNDS = 4
STABILITY_FRACTION = 0.8
STABLE_ARI = 0.99
PARAMS = {"dbscan": ("eps", "min_samples"), "hdbscan": ("min_cluster_size", "min_samples"),
          "kmeans": ("n_clusters",)}


def find_groups(Y, method: str = "dbscan", params: dict | None = None, seed: int = 0, *,
                min_points: int = 10, knee_sample: int = 10_000,
                stability_sample: int = 20_000, silhouette_sample: int = 5_000,
                k_range: tuple[int, int] = (2, 8),
                min_silhouette: float = 0.5) -> tuple[np.ndarray, dict]:
    """Cluster the 2-D points ``Y`` of ONE class; returns ``(groups int64 [N], info)``.

    ``params`` fixes any of the method's parameters (``PARAMS[method]``); the others are
    chosen automatically (see the module docstring). Noise points (label −1) form one group
    of their own. Groups are renumbered 0..G-1 by decreasing size, the noise group last;
    ``info`` records the method, the parameters and which of them were automatic, the group
    sizes and the noise group's id (None when there is none). Fewer than ``min_points``
    points are one group.
    """
    if method not in METHODS:
        raise MedcurateError(f"unknown clustering method {method!r}; known: {', '.join(METHODS)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMS[method]))
    if unknown:
        raise MedcurateError(f"{method} takes no parameter {', '.join(unknown)}; its "
                             f"parameters: {', '.join(PARAMS[method])}")
    Y = backends.as_f32(Y)
    n = len(Y)
    info: dict = {"method": method, "backend": backends.backend_name(), "points": n}
    if n < min_points:
        labels = np.zeros(n, dtype=np.int64)
        info.update(params={}, auto=[], note=f"{n} points < {min_points}: one group")
    else:
        auto = [name for name in PARAMS[method] if name not in params]
        if method == "dbscan":
            labels, chosen = _dbscan(Y, params, seed, knee_sample, stability_sample)
        elif method == "hdbscan":
            labels, chosen = _hdbscan(Y, params, seed, stability_sample)
        else:
            labels, chosen = _kmeans(Y, params, seed, silhouette_sample, k_range,
                                     min_silhouette)
        info.update(params=chosen, auto=auto)
    groups, sizes, noise_group = renumber(labels)
    info.update(n_groups=len(sizes), sizes=sizes, noise_group=noise_group)
    return groups, info


def auto_min_samples(n: int) -> int:
    """``max(4, round(ln N))``: see the module docstring."""
    return max(4, round(math.log(n)))


def knee_eps(Y: np.ndarray, min_samples: int, seed: int = 0,
             knee_sample: int = 10_000) -> float:
    """The knee of the sorted ``min_samples``-distance curve (see the module docstring)."""
    n = len(Y)
    k = min(min_samples, n)
    queries = Y if n <= knee_sample else \
        Y[np.sort(np.random.default_rng(seed).choice(n, knee_sample, replace=False))]
    sq, _ = backends.knn(Y, k, queries=queries)
    curve = np.sort(np.sqrt(sq[:, -1].astype(np.float64)))
    lo, hi = curve[0], curve[-1]
    if hi - lo <= 1e-12 * max(1.0, hi):
        return float(max(hi, 1e-6))  # flat curve (a lattice or duplicates): any eps is the knee
    x = np.linspace(0.0, 1.0, len(curve))
    knee = int(np.argmax(x - (curve - lo) / (hi - lo)))
    return float(max(curve[knee], 1e-6))


def _dbscan(Y: np.ndarray, params: dict, seed: int, knee_sample: int,
            stability_sample: int) -> tuple[np.ndarray, dict]:
    min_samples = int(params.get("min_samples", auto_min_samples(len(Y))))
    if "eps" in params:
        chosen = {"eps": float(params["eps"]), "min_samples": min_samples}
    else:
        knee = knee_eps(Y, min_samples, seed=seed, knee_sample=knee_sample)
        sample = _stability_sample(Y, seed, stability_sample)
        sample_knee = knee if len(sample) == len(Y) else \
            knee_eps(sample, min_samples, seed=seed, knee_sample=knee_sample)
        # A subsample is sparser: in 2-D, distances between neighbours grow as
        # 1 / sqrt(share), so eps does too, or every subsample would shed its rims as noise.
        scale, stability = most_stable(
            sample, EPS_SCALES, lambda P, s: backends.dbscan(
                eps=s * sample_knee * np.sqrt(len(sample) / len(P)),
                min_samples=min_samples).fit_predict(P), seed)
        chosen = {"eps": scale * knee, "min_samples": min_samples, "knee": knee,
                  "eps_scale": scale, "stability": stability}
    labels = backends.dbscan(eps=chosen["eps"], min_samples=min_samples).fit_predict(Y)
    return labels, chosen


def _hdbscan(Y: np.ndarray, params: dict, seed: int,
             stability_sample: int) -> tuple[np.ndarray, dict]:
    n = len(Y)
    min_samples = int(params.get("min_samples", auto_min_samples(n)))
    chosen = {"min_samples": min_samples}
    if "min_cluster_size" in params:
        chosen["min_cluster_size"] = int(params["min_cluster_size"])
    else:
        sample = _stability_sample(Y, seed, stability_sample)
        share, stability = most_stable(
            sample, MIN_CLUSTER_SHARES, lambda P, s: backends.hdbscan(
                min_cluster_size=max(5, round(s * len(P))),
                min_samples=min_samples).fit_predict(P), seed)
        chosen.update(min_cluster_size=max(5, round(share * n)), min_cluster_share=share,
                      stability=stability)
    return backends.hdbscan(min_cluster_size=chosen["min_cluster_size"],
                            min_samples=min_samples).fit_predict(Y), chosen


def _stability_sample(Y: np.ndarray, seed: int, size: int) -> np.ndarray:
    if len(Y) <= size:
        return Y
    return Y[np.sort(np.random.default_rng(seed).choice(len(Y), size, replace=False))]


def most_stable(Y: np.ndarray, candidates, cluster, seed: int) -> tuple[float, dict]:
    """The candidate parameter whose grouping of ``Y`` best survives subsampling (see the
    module docstring): the first of ``candidates`` (ordered finest grouping first) with mean
    adjusted Rand index ≥ ``STABLE_ARI``, else the most stable. ``cluster(points, candidate)``
    returns labels. Returns the candidate and every candidate's stability (for provenance)."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(seed)
    draws = [np.sort(rng.choice(len(Y), max(2, round(STABILITY_FRACTION * len(Y))),
                                replace=False)) for _ in range(STABILITY_ROUNDS)]
    stability = {}
    for candidate in candidates:
        full = cluster(Y, candidate)
        stability[candidate] = round(float(np.mean(
            [adjusted_rand_score(full[rows], cluster(Y[rows], candidate)) for rows in draws])), 4)
    stable = [c for c in candidates if stability[c] >= STABLE_ARI]
    best = stable[0] if stable else \
        max(candidates, key=lambda c: (stability[c], -candidates.index(c)))
    return best, {str(c): v for c, v in stability.items()}


def _kmeans(Y: np.ndarray, params: dict, seed: int, silhouette_sample: int,
            k_range: tuple[int, int], min_silhouette: float) -> tuple[np.ndarray, dict]:
    if "n_clusters" in params:
        k = int(params["n_clusters"])
        chosen = {"n_clusters": k}
    else:
        k, scores = best_k(Y, seed, silhouette_sample=silhouette_sample, k_range=k_range,
                           min_silhouette=min_silhouette)
        chosen = {"n_clusters": k, "silhouette": scores, "min_silhouette": min_silhouette}
    if k == 1:
        return np.zeros(len(Y), dtype=np.int64), chosen
    return backends.kmeans(k, seed, n_init=4).fit_predict(Y), chosen


def best_k(Y: np.ndarray, seed: int, *, silhouette_sample: int = 5_000,
           k_range: tuple[int, int] = (2, 8),
           min_silhouette: float = 0.5) -> tuple[int, dict[int, float]]:
    """The k of ``k_range`` with the best silhouette on a seeded sample, or 1 when the best
    is under ``min_silhouette``; also every k's score (for provenance).

    The sample is small 2-D data, so the search runs single-threaded: OpenMP threads cost
    more than they save there and contend with neighbouring tasks for cores.
    """
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    n = len(Y)
    sample = Y if n <= silhouette_sample else \
        Y[np.sort(np.random.default_rng(seed).choice(n, silhouette_sample, replace=False))]
    scores: dict[int, float] = {}
    with threadpool_limits(limits=1):
        for k in range(k_range[0], min(k_range[1], len(sample) - 1) + 1):
            labels = backends.kmeans(k, seed, n_init=4).fit_predict(sample)
            if len(np.unique(labels)) > 1:
                scores[k] = round(float(silhouette_score(sample, labels)), 4)
    if not scores or max(scores.values()) < min_silhouette:
        return 1, scores
    return max(scores, key=lambda k: (scores[k], -k)), scores


def renumber(labels) -> tuple[np.ndarray, list[int], int | None]:
    """Labels (−1 = noise) → group ids 0..G-1 by decreasing size (ties: the label seen
    first), noise last. Returns ``(groups, sizes, noise_group id or None)``."""
    labels = np.asarray(labels).astype(np.int64)
    values, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True,
                                               return_counts=True)
    noise = values == -1
    order = sorted(range(len(values)), key=lambda i: (bool(noise[i]), -counts[i], first[i]))
    new_id = np.empty(len(values), dtype=np.int64)
    new_id[order] = np.arange(len(values))
    noise_group = int(new_id[noise][0]) if noise.any() else None
    return new_id[inverse.ravel()], [int(counts[i]) for i in order], noise_group
