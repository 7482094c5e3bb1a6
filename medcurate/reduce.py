"""Embeddings → 2-D map (PCA, then UMAP), the space in which confounder groups are found.

PCA first strips the noise dimensions of a 768-d embedding and makes UMAP's neighbour search
cheap; UMAP then keeps local neighbourhoods, so sub-groups that are separate in the
embedding stay separate blobs in 2-D where density clustering can find them.

Ray-free on purpose: a caller that wants the out-of-sample transforms spread over a cluster
passes ``transform_map`` (for example a ``ray.get``-based parallel map).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from medcurate import backends
from medcurate.errors import MedcurateError

TransformMap = Callable[[Callable[[np.ndarray], np.ndarray], list], list]


def serial_map(fn: Callable[[np.ndarray], np.ndarray], chunks: list) -> list:
    """The default ``transform_map``: transform the chunks one after another, here."""
    return [fn(chunk) for chunk in chunks]


def reduce_to_2d(X, *, pca_dims: int = 50, n_neighbors: int = 15, min_dist: float = 0.1,
                 seed: int = 0, fit_sample: int = 20_000, chunk_size: int = 50_000,
                 transform_map: TransformMap | None = None) -> tuple[np.ndarray, dict]:
    """Map the rows of ``X`` (float [N, d]) to float32 [N, 2]; returns ``(coords, info)``.

    - PCA to ``min(pca_dims, d, N - 1)`` dimensions (skipped when that keeps every dimension).
    - UMAP (``n_neighbors``, ``min_dist``) to 2-D. Above ``fit_sample`` rows, UMAP (and PCA)
      are fitted on a seeded random sample of ``fit_sample`` rows and the other rows are
      ``transform``-ed in chunks of ``chunk_size`` through ``transform_map(fn, chunks)``
      (default: serially here), so memory and time stay bounded for millions of rows.
    - Fewer than ``n_neighbors + 2`` rows is too few for a UMAP neighbour graph: PCA to 2-D
      instead, recorded in ``info["method"]`` and ``info["note"]``.

    Deterministic for a ``seed`` on CPU (umap-learn with a ``random_state`` runs
    single-threaded; the chunking is fixed by ``chunk_size``), so the same call gives the
    same map. ``info`` holds every parameter used, for provenance.
    """
    for name, value, least in [("pca_dims", pca_dims, 2), ("n_neighbors", n_neighbors, 2),
                               ("fit_sample", fit_sample, n_neighbors + 2),
                               ("chunk_size", chunk_size, 1)]:
        if value < least:
            raise MedcurateError(f"{name} must be at least {least}; got {value}")
    X = backends.as_f32(X)
    n, d = X.shape
    info = {"backend": backends.backend_name(), "rows": n, "seed": seed}
    if n < n_neighbors + 2:
        info.update(method="pca-2d", note=f"{n} rows < n_neighbors + 2 = {n_neighbors + 2}: "
                    "too few for UMAP, PCA to 2-D instead")
        return _pca_2d(X, seed), info
    fit_rows = _fit_rows(n, fit_sample, seed)
    Z, dims = _pca(X, fit_rows, pca_dims, seed)
    model = backends.umap(n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    coords = np.empty((n, 2), dtype=np.float32)
    if fit_rows is None:
        coords[:] = model.fit_transform(Z)
    else:
        coords[fit_rows] = model.fit_transform(Z[fit_rows])
        rest = np.setdiff1d(np.arange(n), fit_rows)
        chunks = [Z[rest[i:i + chunk_size]] for i in range(0, len(rest), chunk_size)]
        coords[rest] = np.concatenate((transform_map or serial_map)(model.transform, chunks))
    info.update(method="pca+umap" if dims else "umap", pca_dims=dims, n_neighbors=n_neighbors,
                min_dist=min_dist, fit_rows=n if fit_rows is None else len(fit_rows),
                transformed_rows=0 if fit_rows is None else n - len(fit_rows),
                chunk_size=chunk_size)
    return coords, info


def _fit_rows(n: int, fit_sample: int, seed: int) -> np.ndarray | None:
    """Sorted seeded sample of rows to fit on, or None when every row is fitted."""
    if n <= fit_sample:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, fit_sample, replace=False))


def _pca(X: np.ndarray, fit_rows: np.ndarray | None, pca_dims: int,
         seed: int) -> tuple[np.ndarray, int | None]:
    """PCA to ``min(pca_dims, d, rows fitted - 1)`` dims; ``None`` dims when PCA is skipped."""
    n_fit = len(X) if fit_rows is None else len(fit_rows)
    dims = min(pca_dims, X.shape[1], n_fit - 1)
    if dims >= X.shape[1]:
        return X, None
    model = backends.pca(dims, seed)
    model.fit(X if fit_rows is None else X[fit_rows])
    return backends.as_f32(model.transform(X)), dims


def _pca_2d(X: np.ndarray, seed: int) -> np.ndarray:
    """PCA to at most 2 dims, zero-padded to 2 columns (1 row or 1 feature still maps)."""
    n, d = X.shape
    dims = min(2, d, n - 1)
    coords = np.zeros((n, 2), dtype=np.float32)
    if dims > 0:
        coords[:, :dims] = backends.pca(dims, seed).fit_transform(X)
    return coords
