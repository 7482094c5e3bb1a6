"""The one place that picks GPU (RAPIDS cuML, faiss-gpu) or CPU (umap-learn, scikit-learn,
hdbscan, faiss-cpu) implementations of the reduction, clustering and neighbour steps.

``MEDCURATE_BACKEND=auto|cpu|gpu`` (default ``auto``: GPU when ``cuml`` imports and CUDA
reports a device). Every factory returns an estimator with the scikit-learn interface
(``fit``, ``fit_transform``, ``transform``, ``fit_predict``); the GPU ones are built with
``output_type="numpy"`` so callers only ever see numpy arrays. cuML and faiss-gpu are
imported lazily, so a CPU-only install never needs them.

All neighbour and distance steps go through faiss on float32 data: exact ``IndexFlatL2`` up
to ``exact_max`` rows, an inverted-file index (approximate, ``nprobe`` lists searched) above,
so a self-k-NN over millions of rows stays tractable on CPU.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from medcurate.errors import MedcurateError

BACKEND_ENV = "MEDCURATE_BACKEND"
BACKEND_CHOICES = ("auto", "cpu", "gpu")


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when RAPIDS cuML imports and CUDA reports at least one device."""
    try:
        import cuml  # noqa: F401
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:  # no driver or no device
        return False


def backend_name() -> str:
    """``"gpu"`` or ``"cpu"``, from ``MEDCURATE_BACKEND`` and what this machine has.

    Read on every call (not cached) so a job or test can switch with the environment;
    recorded in provenance so a selection says which implementations made it.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKEND_CHOICES:
        raise MedcurateError(f"{BACKEND_ENV}={choice!r} is not one of "
                             f"{', '.join(BACKEND_CHOICES)}")
    if choice == "cpu":
        return "cpu"
    if gpu_available():
        return "gpu"
    if choice == "gpu":
        raise MedcurateError(f"{BACKEND_ENV}=gpu but RAPIDS cuML or a CUDA device is missing: "
                             "install medcurate[gpu] on a GPU machine, or set "
                             f"{BACKEND_ENV}=auto or cpu")
    return "cpu"


def pca(n_components: int, seed: int = 0):
    """PCA estimator. scikit-learn's ``svd_solver="auto"`` picks an exact covariance
    eigensolver for tall data and a seeded randomized SVD otherwise: both deterministic."""
    if backend_name() == "gpu":
        from cuml.decomposition import PCA

        return PCA(n_components=n_components, output_type="numpy")
    from sklearn.decomposition import PCA

    return PCA(n_components=n_components, random_state=seed)


def umap(n_neighbors: int, min_dist: float, seed: int):
    """UMAP to 2-D. On CPU a ``random_state`` makes umap-learn run single-threaded and
    deterministic (fit and, through ``transform_seed``, transform); cuML's ``random_state``
    gives its reproducible mode."""
    if backend_name() == "gpu":
        from cuml.manifold import UMAP

        return UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                    random_state=seed, output_type="numpy")
    from umap import UMAP

    return UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                random_state=seed, transform_seed=seed, n_jobs=1)


def dbscan(eps: float, min_samples: int):
    """DBSCAN; ``min_samples`` counts the point itself on both backends."""
    if backend_name() == "gpu":
        from cuml.cluster import DBSCAN

        return DBSCAN(eps=eps, min_samples=min_samples, output_type="numpy")
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples)


def hdbscan(min_cluster_size: int, min_samples: int, allow_single_cluster: bool = True):
    """HDBSCAN (excess-of-mass selection on both backends). ``allow_single_cluster`` lets a
    class without sub-groups stay one group instead of being cut into arbitrary crumbs."""
    if backend_name() == "gpu":
        from cuml.cluster.hdbscan import HDBSCAN

        return HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples,
                       allow_single_cluster=allow_single_cluster, output_type="numpy")
    from hdbscan import HDBSCAN

    return HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples,
                   allow_single_cluster=allow_single_cluster)


def kmeans(n_clusters: int, seed: int, n_init: int = 1):
    """k-means with k-means++ style seeding; ``n_init`` restarts keep the lowest inertia."""
    if backend_name() == "gpu":
        from cuml.cluster import KMeans

        return KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init,
                      output_type="numpy")
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init)


def as_f32(X) -> np.ndarray:
    """C-contiguous float32 rows, the layout faiss needs (no copy when X already is)."""
    return np.ascontiguousarray(X, dtype=np.float32)


@lru_cache(maxsize=1)
def _faiss_gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


def _faiss_on_gpu() -> bool:
    """True when the GPU backend is active and faiss-gpu is installed (faiss-cpu lacks
    ``StandardGpuResources``) and sees a device."""
    import faiss

    return backend_name() == "gpu" and hasattr(faiss, "StandardGpuResources") \
        and faiss.get_num_gpus() > 0


def _on_device(index):
    """Move a faiss index to GPU 0 where ``_faiss_on_gpu``; otherwise keep it on CPU."""
    import faiss

    if _faiss_on_gpu():
        return faiss.index_cpu_to_gpu(_faiss_gpu_resources(), 0, index)
    return index


def _index(X: np.ndarray, exact_max: int, nprobe: int, seed: int):
    """Exact flat L2 index, or IVF-flat above ``exact_max`` rows: ``4·sqrt(N)`` lists
    trained on a seeded sample of ``64`` rows per list (faiss wants at least 39)."""
    import faiss

    n, d = X.shape
    if n <= exact_max:
        index = _on_device(faiss.IndexFlatL2(d))
        index.add(X)
        return index
    nlist = int(4 * np.sqrt(n))
    train = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    index.cp.seed = seed
    index = _on_device(index)
    index.train(X[np.sort(train)])
    index.add(X)
    index.nprobe = nprobe
    return index


def knn(X, k: int, queries=None, *, exact_max: int = 50_000, nprobe: int = 32,
        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``X`` to each query (default: every row of ``X``, which
    then finds itself, or an exact duplicate, first). Returns squared L2 distances
    (float32 [q, k]) and row indices (int64 [q, k]), nearest first.

    Exact up to ``exact_max`` rows of ``X``; approximate (IVF, ``nprobe`` lists) above.
    faiss-gpu limits ``k`` to 2048, far above what the selection steps ask for.
    """
    X = as_f32(X)
    if not 1 <= k <= len(X):
        raise ValueError(f"k={k} needs 1 <= k <= {len(X)} rows")
    Q = X if queries is None else as_f32(queries)
    sq, idx = _index(X, exact_max, nprobe, seed).search(Q, k)
    return np.maximum(sq, 0.0), idx.astype(np.int64)


def kmeans_centres(X, k: int, *, sample: int, iterations: int, seed: int) -> np.ndarray:
    """``k`` k-means centres (float32 [k, d]) of a seeded sample of ``sample`` rows of ``X``,
    by faiss (on the GPU where ``_faiss_on_gpu``): the coarse lists of a search over millions
    of rows, where a few rounds on a small sample place the centres well enough and a full
    fit would cost more than the search itself."""
    import faiss

    X = as_f32(X)
    n, d = X.shape
    if not 1 <= k <= min(n, sample):
        raise ValueError(f"k={k} centres need 1 <= k <= min(rows {n}, sample {sample})")
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, sample), replace=False))
    kmeans = faiss.Kmeans(d, k, niter=iterations, seed=seed, gpu=_faiss_on_gpu(),
                          min_points_per_centroid=1, max_points_per_centroid=sample)
    kmeans.train(X[rows])
    return kmeans.centroids


def similar_pairs(Q, B, at_least: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i, j) with ``Q[i] · B[j] >= at_least``: row of Q (int64), row of B (int64)
    and the product (float32), in row-major order. One matrix product (cupy on the GPU
    backend, BLAS on CPU); callers bound its size by passing Q a block at a time."""
    if backend_name() == "gpu":
        import cupy

        S = cupy.asarray(Q) @ cupy.asarray(B).T
        qi, bj = cupy.nonzero(S >= at_least)
        return (cupy.asnumpy(qi).astype(np.int64), cupy.asnumpy(bj).astype(np.int64),
                cupy.asnumpy(S[qi, bj]))
    S = as_f32(Q) @ as_f32(B).T
    qi, bj = np.nonzero(S >= at_least)
    return qi.astype(np.int64), bj.astype(np.int64), S[qi, bj]


def nearest_center(X, centers) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``X``: squared distance to its nearest centre (float32 [N]) and that
    centre's index (int64 [N])."""
    sq, idx = knn(centers, 1, queries=X)
    return sq[:, 0], idx[:, 0]


class DistancesTo:
    """Squared L2 distances from one query at a time to every row of a fixed ``X`` (float32
    [N]): the rows' squared norms are computed once, each query is then one matrix-vector
    product. The greedy selections (k-center, herding, farthest points) ask hundreds of
    queries of the same rows; a fresh pairwise call per query recomputed every norm and cost
    5x more (0.55 vs 0.11 ms on 25k x 64), most of an HTTP selection's time."""

    def __init__(self, X):
        self.X = as_f32(X)
        self.norms = np.einsum("ij,ij->i", self.X, self.X)

    def __call__(self, query) -> np.ndarray:
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        sq = self.X @ query
        sq *= -2.0
        sq += self.norms
        sq += np.float32(query @ query)
        return np.maximum(sq, 0.0, out=sq)


def sq_dists(queries, X) -> np.ndarray:
    """Squared L2 distances float32 [q, N] from a few query rows to every row of ``X``.

    Memory is q×N, so callers pass one or a handful of queries (a centre, the latest pick):
    this is how greedy selections keep an O(N) running-distance vector.
    """
    import faiss

    return np.maximum(faiss.pairwise_distances(as_f32(queries), as_f32(X)), 0.0)
