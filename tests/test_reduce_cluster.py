"""The building blocks of confounder-aware selection: backends, the 2-D map, the groups."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from medcurate import backends
from medcurate.cluster import (EPS_SCALES, MIN_CLUSTER_SHARES, STABLE_ARI, find_groups,
                               most_stable, renumber)
from medcurate.errors import MedcurateError
from medcurate.reduce import reduce_to_2d


def blobs(sizes, centers, stds, seed=0):
    """Planted 2-D clusters and their true labels."""
    rng = np.random.default_rng(seed)
    Y = np.concatenate([rng.normal(c, s, size=(n, 2)) for n, c, s in zip(sizes, centers, stds)])
    return Y.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


PLANTED = {
    "three": blobs([300, 150, 50], [(0, 0), (10, 0), (0, 10)], [1, 1, 1]),
    "rare-and-dense": blobs([900, 100], [(0, 0), (10, 0)], [1, 0.5], seed=1),
    "uneven-spread": blobs([2000, 500, 200], [(0, 0), (12, 0), (0, 12)], [1, 2, 0.5], seed=2),
}


# ---- backends ------------------------------------------------------------------------------

def test_backend_choice_from_environment(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    assert backends.backend_name() == "cpu"
    monkeypatch.setenv(backends.BACKEND_ENV, "auto")
    assert backends.backend_name() == ("gpu" if backends.gpu_available() else "cpu")
    monkeypatch.setenv(backends.BACKEND_ENV, "tpu")
    with pytest.raises(MedcurateError, match="not one of auto, cpu, gpu"):
        backends.backend_name()
    if not backends.gpu_available():
        monkeypatch.setenv(backends.BACKEND_ENV, "gpu")
        with pytest.raises(MedcurateError, match="cuML or a CUDA device is missing"):
            backends.backend_name()


def test_knn_is_exact_and_ivf_is_close():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 16)).astype(np.float32)
    sq, idx = backends.knn(X, 5)
    brute = ((X[:50, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx[:50], np.argsort(brute, axis=1)[:, :5])
    np.testing.assert_allclose(sq[:50], np.sort(brute, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    assert idx.dtype == np.int64 and sq.dtype == np.float32 and (idx[:, 0] == np.arange(3000)).all()
    _, approx = backends.knn(X, 5, exact_max=1000, nprobe=32)  # IVF path, 219 lists
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx, idx)])
    assert recall > 0.9
    with pytest.raises(ValueError):
        backends.knn(X[:3], 4)


def test_nearest_center_and_sq_dists():
    centers = np.array([[0, 0], [10, 0]], dtype=np.float32)
    X = np.array([[1, 0], [9, 1], [4, 0]], dtype=np.float32)
    sq, idx = backends.nearest_center(X, centers)
    np.testing.assert_array_equal(idx, [0, 1, 0])
    np.testing.assert_allclose(sq, [1, 2, 16])
    np.testing.assert_allclose(backends.sq_dists(centers[:1], X), [[1, 82, 16]])


# ---- reduce --------------------------------------------------------------------------------

def test_reduce_tiny_input_falls_back_to_pca():
    X = np.random.default_rng(0).normal(size=(10, 30)).astype(np.float32)
    coords, info = reduce_to_2d(X)
    assert coords.shape == (10, 2) and coords.dtype == np.float32
    assert info["method"] == "pca-2d" and "too few for UMAP" in info["note"]
    one, info = reduce_to_2d(X[:1])
    np.testing.assert_array_equal(one, [[0, 0]])
    with pytest.raises(MedcurateError, match="n_neighbors must be at least 2"):
        reduce_to_2d(X, n_neighbors=1)


def test_reduce_fits_on_a_sample_and_transforms_the_rest_in_chunks():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 40)) * 8
    X = np.concatenate([c + rng.normal(size=(250, 40)) for c in centers]).astype(np.float32)
    calls = []

    def recording_map(fn, chunks):
        calls.append([len(chunk) for chunk in chunks])
        return [fn(chunk) for chunk in chunks]

    kwargs = dict(pca_dims=10, seed=4, fit_sample=300, chunk_size=80)
    coords, info = reduce_to_2d(X, transform_map=recording_map, **kwargs)
    assert calls == [[80, 80, 40]]
    assert coords.shape == (500, 2) and np.isfinite(coords).all()
    assert (info["method"], info["pca_dims"], info["fit_rows"], info["transformed_rows"]) == \
        ("pca+umap", 10, 300, 200)
    # transformed points land with their own blob: the two blobs stay separable
    groups, _ = find_groups(coords, "kmeans", {"n_clusters": 2})
    assert adjusted_rand_score(np.repeat([0, 1], 250), groups) > 0.9
    again, _ = reduce_to_2d(X, **kwargs)  # default serial map, same seed: same map
    np.testing.assert_array_equal(coords, again)


# ---- cluster -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dbscan", "hdbscan", "kmeans"])
@pytest.mark.parametrize("case", list(PLANTED))
def test_auto_parameters_recover_planted_clusters(method, case):
    Y, truth = PLANTED[case]
    groups, info = find_groups(Y, method)
    assert groups.dtype == np.int64
    assert adjusted_rand_score(truth, groups) > 0.9, info
    assert info["auto"] and set(info["auto"]) <= set(info["params"])
    clusters = info["sizes"][:info["noise_group"]]  # the noise group, if any, comes last
    assert info["noise_group"] in (None, info["n_groups"] - 1)
    assert clusters == sorted(clusters, reverse=True)


def test_dbscan_auto_rule_is_recorded():
    Y, _ = PLANTED["three"]
    _, info = find_groups(Y, "dbscan")
    params = info["params"]
    assert params["min_samples"] == max(4, round(np.log(500)))
    assert params["eps"] == pytest.approx(params["eps_scale"] * params["knee"])
    assert params["eps_scale"] in EPS_SCALES
    assert set(params["stability"]) == {str(scale) for scale in EPS_SCALES}


@pytest.mark.parametrize("case", list(PLANTED))
@pytest.mark.parametrize("method, chosen, candidates", [
    pytest.param("dbscan", "eps_scale", EPS_SCALES, id="dbscan"),
    pytest.param("hdbscan", "min_cluster_share", MIN_CLUSTER_SHARES, id="hdbscan")])
def test_stability_choice_is_recorded_stable_and_recovers_planted_groups(case, method, chosen,
                                                                         candidates):
    Y, truth = PLANTED[case]
    groups, info = find_groups(Y, method, seed=0)
    params = info["params"]
    stability = params["stability"]
    assert set(stability) == {str(c) for c in candidates}
    assert all(0.0 <= float(v) <= 1.0 + 1e-9 for v in stability.values())
    assert params[chosen] in candidates
    assert stability[str(params[chosen])] >= STABLE_ARI, params
    # the finest stable candidate wins: every finer one is unstable
    finer = candidates[:candidates.index(params[chosen])]
    assert all(stability[str(c)] < STABLE_ARI for c in finer), params
    assert adjusted_rand_score(truth, groups) >= 0.95, (info["sizes"], params)
    again, info_again = find_groups(Y, method, seed=0)  # deterministic for a seed
    np.testing.assert_array_equal(groups, again)
    assert info_again["params"]["stability"] == stability


def test_most_stable_picks_the_finest_stable_candidate_else_the_most_stable():
    Y = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    row_of = {p.tobytes(): i for i, p in enumerate(Y)}
    truth = np.arange(200) % 3  # labels owned by the points: the same in every subsample
    calls = iter(range(10_000))

    def cluster(P, candidate):
        rows = [row_of[p.tobytes()] for p in P]
        if candidate == "stable-3":
            return truth[rows]
        if candidate == "stable-1":
            return np.zeros(len(P), dtype=int)
        # a fresh random split on every call: unstable
        return np.random.default_rng(next(calls)).integers(0, 3, len(P))

    best, stability = most_stable(Y, ("random", "stable-3", "stable-1"), cluster, seed=0)
    assert best == "stable-3"  # the finest (first) of the stable ones, not the one blob
    assert stability["stable-3"] == stability["stable-1"] == 1.0
    assert stability["random"] < STABLE_ARI
    best, stability = most_stable(Y, ("random", "random-too"), cluster, seed=0)
    assert max(stability.values()) < STABLE_ARI
    assert best == max(("random", "random-too"), key=lambda c: (stability[c], c == "random"))


def test_given_params_override_and_are_validated():
    Y, _ = PLANTED["three"]
    _, info = find_groups(Y, "dbscan", {"eps": 0.5})
    assert info["params"]["eps"] == 0.5 and info["auto"] == ["min_samples"]
    groups, info = find_groups(Y, "kmeans", {"n_clusters": 4})
    assert info["n_groups"] == 4 and info["auto"] == []
    with pytest.raises(MedcurateError, match="dbscan takes no parameter n_clusters"):
        find_groups(Y, "dbscan", {"n_clusters": 3})
    with pytest.raises(MedcurateError, match="unknown clustering method 'optics'"):
        find_groups(Y, "optics")


def test_one_blob_is_one_group_for_kmeans_and_tiny_input_is_one_group():
    Y = np.random.default_rng(0).normal(size=(400, 2)).astype(np.float32)
    groups, info = find_groups(Y, "kmeans")
    assert info["n_groups"] == 1 and info["params"]["n_clusters"] == 1
    groups, info = find_groups(Y[:6], "dbscan")
    assert (groups == 0).all() and "one group" in info["note"]


def test_renumber_orders_groups_by_size_with_noise_last():
    groups, sizes, noise = renumber([5, 5, -1, 7, 7, 7, -1, -1, -1, 2])
    np.testing.assert_array_equal(groups, [1, 1, 3, 0, 0, 0, 3, 3, 3, 2])
    assert sizes == [3, 2, 1, 4] and noise == 3
