"""Selection strategies on planted data: hidden 90/10 sub-groups per class, outliers, strata.

UMAP-based strategies (confounder-aware, cluster-random) are run few times and their results
shared through module fixtures: the first UMAP call compiles numba code (~25 s).
"""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest

from medcurate.errors import MedcurateError
from medcurate.select import STRATEGIES, select, split_budget, strategy_params, validate_inputs
from medcurate.select.baselines import facility_location, herding, kcenter, random_uniform
from medcurate.select.confounder import confounder_aware, order_within

BUDGET = 20
PER_CLASS_STRATEGIES = [name for name in STRATEGIES if name != "random"]
FAST_STRATEGIES = ["stratified", "kcenter", "herding", "facility-location", "typicality"]


def planted(n_per_class: int = 240, d: int = 64, classes: int = 3, rare: float = 0.1,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings whose classes each hide two sub-groups at (1 − rare)/rare proportions:
    isotropic noise around a class mean, the rare sub-group shifted 1.5·sqrt(d) along a
    random direction (well separated, as a scanner or burned-in tag would be)."""
    rng = np.random.default_rng(seed)
    X, labels, sub = [], [], []
    n_rare = round(n_per_class * rare)
    for c in range(classes):
        direction = rng.normal(size=d)
        direction /= np.linalg.norm(direction)
        is_rare = np.r_[np.zeros(n_per_class - n_rare, int), np.ones(n_rare, int)]
        rng.shuffle(is_rare)
        X.append(3 * rng.normal(size=d) + rng.normal(size=(n_per_class, d))
                 + np.outer(is_rare, 1.5 * np.sqrt(d) * direction))
        labels += [f"class{c}"] * n_per_class
        sub.append(is_rare)
    return np.concatenate(X).astype(np.float32), np.array(labels), np.concatenate(sub)


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def confounder_runs(data):
    """confounder-aware at N=20: seed 0 on every class, then class0 alone with seeds 0 and 1
    (each class's seed derives from the seed and its label, so class0 alone must repeat)."""
    X, labels, _ = data
    only = labels == "class0"
    return (confounder_aware(X, labels, BUDGET, seed=0),
            confounder_aware(X[only], labels[only], BUDGET, seed=0),
            confounder_aware(X[only], labels[only], BUDGET, seed=1))


def per_class_counts(result, labels, sub) -> dict[str, tuple[int, int]]:
    """class → (selected, of which from the rare sub-group)."""
    chosen = result.indices
    return {c: (int((labels[chosen] == c).sum()), int(sub[chosen][labels[chosen] == c].sum()))
            for c in np.unique(labels)}


def assert_valid(result, labels, budget=BUDGET):
    """Right count per class, unique indices, each inside its class, one reason each."""
    chosen = result.indices
    assert chosen.dtype == np.int64
    assert len(np.unique(chosen)) == len(chosen)
    assert len(result.reason) == len(result.group) == len(chosen)
    for c in np.unique(labels):
        assert (labels[chosen] == c).sum() == min(budget, (labels == c).sum())
    for index, reason in zip(chosen, result.reason):
        assert f"class {labels[index]}, " in reason
    json.dumps(result.info)  # provenance-ready


# ---- the acceptance test -------------------------------------------------------------

def test_confounder_aware_covers_rare_subgroup_and_keeps_proportions(data, confounder_runs):
    X, labels, sub = data
    only = labels == "class0"
    for result, rows in zip(confounder_runs, [np.ones(len(X), bool), only, only]):
        assert_valid(result, labels[rows])
        for c, (taken, rare) in per_class_counts(result, labels[rows], sub[rows]).items():
            assert taken == BUDGET
            assert 1 <= rare and abs(rare - 2) <= 1, (c, rare)  # 90/10 of 20 → 18/2, ±1


def test_confounder_aware_same_seed_same_selection(data, confounder_runs):
    _, labels, _ = data
    everything, alone, other_seed = confounder_runs
    only = labels == "class0"
    first = labels[everything.indices] == "class0"
    np.testing.assert_array_equal(everything.indices[first], alone.indices)
    np.testing.assert_array_equal(everything.coords[only], alone.coords)
    assert [r for r, f in zip(everything.reason, first) if f] == alone.reason
    assert not np.array_equal(alone.coords, other_seed.coords)  # the seed reaches the map


def test_confounder_aware_exposes_map_and_groups(data, confounder_runs):
    X, labels, sub = data
    result = confounder_runs[0]
    assert result.coords.shape == (len(X), 2) and result.coords.dtype == np.float32
    assert result.point_groups.shape == (len(X),)
    np.testing.assert_array_equal(result.point_groups[result.indices], result.group)
    for c in np.unique(labels):
        info = result.info["classes"][c]
        assert info["reduce"]["method"] == "pca+umap"
        assert set(info["cluster"]["auto"]) == {"eps", "min_samples"}
        assert sum(info["allocation"]) == BUDGET
        # the groups are the planted sub-groups (up to DBSCAN's few noise points)
        rows = labels == c
        for group in np.unique(result.point_groups[rows]):
            if group != info["cluster"]["noise_group"]:
                members = sub[rows][result.point_groups[rows] == group]
                assert members.min() == members.max()
    assert "group 0 (" in result.reason[0] and "distance rank" in result.reason[0]


def test_confounder_aware_768d():
    X, labels, sub = planted(n_per_class=200, d=768, classes=2, seed=3)
    result = confounder_aware(X, labels, BUDGET, seed=0)
    assert_valid(result, labels)
    for taken, rare in per_class_counts(result, labels, sub).values():
        assert 1 <= rare <= 3


# ---- within-group ordering (no UMAP needed) ---------------------------------------------------

def test_order_within_quantile_spans_typical_to_atypical():
    P = np.column_stack([np.arange(1, 101, dtype=np.float32), np.zeros(100, np.float32)])
    P -= P.mean(axis=0)  # distance to the centre = |x|, ranks known
    chosen, reasons = order_within(P, 4, "quantile")
    ranks = np.argsort(np.argsort(np.abs(P[:, 0]), kind="stable"), kind="stable")
    np.testing.assert_array_equal(ranks[chosen], [12, 37, 62, 87])
    assert reasons[0] == "distance rank 13 of 100 (quantile 0.12)"
    median, _ = order_within(P, 1, "quantile")
    assert ranks[median[0]] == 50
    assert len(set(order_within(P, 100, "quantile")[0].tolist())) == 100  # k = m: all


def test_order_within_nearest_and_farthest():
    rng = np.random.default_rng(0)
    P = rng.normal(size=(200, 2)).astype(np.float32)
    P[7] = [40, 0]  # an outlier
    nearest, _ = order_within(P, 5, "nearest")
    distances = np.linalg.norm(P - P.mean(axis=0), axis=1)
    np.testing.assert_array_equal(np.sort(nearest), np.sort(np.argsort(distances)[:5]))
    farthest, reasons = order_within(P, 5, "farthest")
    assert farthest[0] == np.argmin(distances) and farthest[1] == 7
    assert len(set(farthest.tolist())) == 5 and "farthest-point pick 2" in reasons[1]


@pytest.mark.parametrize("within", ["quantile", "nearest", "farthest"])
@pytest.mark.parametrize("space", ["map", "embedding"])
def test_confounder_aware_variants_on_small_classes(within, space):
    """Classes under n_neighbors + 2 rows map by PCA (no UMAP), so every variant is cheap."""
    X, labels, _ = planted(n_per_class=16, d=12, classes=2, seed=2)
    result = confounder_aware(X, labels, 5, within=within, distance_space=space)
    assert_valid(result, labels, budget=5)
    assert result.info["classes"]["class0"]["reduce"]["method"] == "pca-2d"
    assert result.info["params"]["within"] == within


# ---- split_budget ------------------------------------------------------------------------------

def test_split_budget_proportional_with_largest_remainder():
    assert split_budget([90, 10], 20) == [18, 2]
    assert split_budget([50, 30, 20], 7) == [4, 2, 1]  # quotas 3.5, 2.1, 1.4: 0.5 wins
    assert split_budget([1, 1, 1], 2) == [1, 1, 0]  # ties: earlier group
    assert split_budget({"a": 300, "b": 100}, 10) == {"a": 8, "b": 2}  # 7.5/2.5: larger wins
    assert split_budget([5, 5], 3) == [2, 1]


def test_split_budget_at_least_one_then_largest_win():
    assert split_budget([1000, 3, 2], 10) == [8, 1, 1]
    assert split_budget([5, 50, 3, 20], 2) == [0, 1, 0, 1]  # budget < groups: largest win
    assert split_budget([100, 1], 20, minimum=0) == [20, 0]  # plain proportional


def test_split_budget_caps_sums_and_minimum():
    assert split_budget([2, 100], 50, minimum=5) == [2, 48]  # never above a group's size
    assert split_budget([3, 4], 10) == [3, 4]  # budget above the total: everything
    assert split_budget([], 5) == [] and split_budget([0, 0], 5) == [0, 0]
    assert split_budget([100, 40, 2], 20, minimum=3) == [13, 5, 2]  # a 2-group gives all
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 60, size=rng.integers(1, 9)).tolist()
        budget, minimum = int(rng.integers(0, 120)), int(rng.integers(0, 4))
        alloc = split_budget(sizes, budget, minimum=minimum)
        assert sum(alloc) == min(budget, sum(sizes))
        assert all(0 <= a <= s for a, s in zip(alloc, sizes))
        floors = [min(minimum, s) for s in sizes]
        if sum(floors) <= budget:
            assert all(a >= f for a, f in zip(alloc, floors))


def test_split_budget_rejects_bad_sizes():
    with pytest.raises(MedcurateError, match="non-negative"):
        split_budget([3, -1], 2)
    with pytest.raises(MedcurateError, match="budget"):
        split_budget([3, 1], -2)


# ---- baselines ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", FAST_STRATEGIES)
def test_baseline_counts_uniqueness_and_determinism(data, strategy):
    X, labels, sub = data
    result = select(strategy, X, labels, BUDGET, seed=5)
    assert_valid(result, labels)
    again = select(strategy, X, labels, BUDGET, seed=5)
    np.testing.assert_array_equal(result.indices, again.indices)


def test_cluster_random_uses_the_groups_and_is_deterministic(data, confounder_runs):
    X, labels, sub = data
    result = select("cluster-random", X, labels, BUDGET, seed=0)
    assert_valid(result, labels)
    for taken, rare in per_class_counts(result, labels, sub).values():
        assert 1 <= rare <= 3
    # the same maps, groups and budget split as confounder-aware with the same seed
    np.testing.assert_array_equal(result.point_groups, confounder_runs[0].point_groups)
    np.testing.assert_array_equal(np.sort(result.group), np.sort(confounder_runs[0].group))
    only = labels == "class0"  # class0 alone repeats its picks: deterministic per class
    np.testing.assert_array_equal(
        result.indices[labels[result.indices] == "class0"],
        select("cluster-random", X[only], labels[only], BUDGET, seed=0).indices)


def test_stratified_seed_changes_the_draw(data):
    X, labels, _ = data
    assert not np.array_equal(select("stratified", X, labels, BUDGET, seed=0).indices,
                              select("stratified", X, labels, BUDGET, seed=1).indices)


def test_random_is_archive_wide_not_per_class():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 8)).astype(np.float32)
    labels = np.array(["common"] * 950 + ["rare"] * 50)
    result = random_uniform(X, labels, BUDGET, seed=0)
    assert len(result.indices) == 2 * BUDGET == len(np.unique(result.indices))
    taken = result.info["classes"]
    assert taken["common"]["taken"] + taken["rare"]["taken"] == 40
    assert taken["rare"]["taken"] < BUDGET  # follows the archive's 95/5 mix, not 20/20
    assert (result.group == -1).all()
    np.testing.assert_array_equal(result.indices,
                                  random_uniform(X, labels, BUDGET, seed=0).indices)


def test_kcenter_picks_planted_outliers_first():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    outliers = [17, 123, 250]
    X[outliers] += 30 * rng.normal(size=(3, 16)).astype(np.float32)
    result = kcenter(X, np.zeros(300, int), 10)
    assert set(result.indices[1:4].tolist()) == set(outliers)
    assert "nearest the class mean" in result.reason[0]


@pytest.mark.parametrize("strategy", [herding, facility_location])
def test_herding_and_facility_location_cover_both_subgroups(data, strategy):
    X, labels, sub = data
    result = strategy(X, labels, BUDGET)
    for taken, rare in per_class_counts(result, labels, sub).values():
        assert taken == BUDGET and 1 <= rare < taken


def test_typicality_picks_one_typical_point_per_kmeans_cluster(data):
    X, labels, _ = data
    result = select("typicality", X, labels, BUDGET, seed=0)
    for c in np.unique(labels):
        groups = result.group[labels[result.indices] == c]
        assert len(np.unique(groups)) == BUDGET  # one pick from each of the 20 clusters


@pytest.mark.parametrize("strategy", ["kcenter", "facility-location"])
def test_greedy_selection_is_memory_safe_at_moderate_n(strategy):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20_000, 64)).astype(np.float32)
    labels = np.zeros(len(X), dtype=int)
    tracemalloc.start()
    started = time.perf_counter()
    result = select(strategy, X, labels, 50)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(np.unique(result.indices)) == 50
    assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MiB: an N×N matrix would be 1.6 GB"
    assert seconds < 60


# ---- bad input ---------------------------------------------------------------------------------

def test_nan_and_inf_rows_are_named():
    X = np.ones((10, 4), dtype=np.float32)
    X[3, 1], X[7, 0] = np.nan, np.inf
    with pytest.raises(MedcurateError, match=r"2 embedding rows hold NaN or inf \(first: row 3\)"):
        select("kcenter", X, np.zeros(10), 2)


@pytest.mark.parametrize("X, labels, budget, message", [
    (np.ones(10), np.zeros(10), 2, "2-D"),
    (np.ones((10, 4)), np.zeros(9), 2, "one per embedding row"),
    (np.ones((10, 4)), np.zeros(10), 0, "positive integer"),
    (np.ones((10, 4)), np.zeros(10), -3, "positive integer"),
    (np.ones((10, 4)), np.zeros(10), 2.5, "positive integer"),
    (np.ones((10, 4)), np.array([None] * 10), 2, "missing"),
])
def test_bad_input_is_a_medcurate_error(X, labels, budget, message):
    with pytest.raises(MedcurateError, match=message):
        validate_inputs(X, labels, budget)
    with pytest.raises(MedcurateError, match=message):
        select("stratified", X, labels, budget)


def test_unknown_strategy_and_parameter():
    with pytest.raises(MedcurateError, match="known: confounder-aware, random, stratified"):
        select("best", np.ones((4, 2)), np.zeros(4), 1)
    with pytest.raises(MedcurateError, match="kcenter takes no parameter eps"):
        select("kcenter", np.ones((4, 2)), np.zeros(4), 1, eps=0.3)
    with pytest.raises(MedcurateError, match="unknown within"):
        select("confounder-aware", np.ones((4, 2)), np.zeros(4), 1, within="middle")
    assert strategy_params("facility-location") == {"n_neighbors": 20}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_class_smaller_than_budget_is_taken_whole_and_noted(strategy):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 6)).astype(np.float32)
    labels = np.array(["df"] * 8 + ["nv"] * 12)
    result = select(strategy, X, labels, BUDGET)
    np.testing.assert_array_equal(np.sort(result.indices), np.arange(20))
    if strategy != "random":
        assert "class df has 8 images < budget 20: took all" in result.info["notes"]
        assert result.info["classes"]["df"]["taken"] == 8
    json.dumps(result.info)


# ---- strata ------------------------------------------------------------------------------------

def strata_data():
    """Two classes of 400; a site stratum independent of everything at 60/30/10."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(800, 8)).astype(np.float32)
    labels = np.repeat(["a", "b"], 400)
    sites = rng.choice(["site1", "site2", "site3"], size=800, p=[0.6, 0.3, 0.1])
    return X, labels, sites


def cell_counts(result, labels, strata):
    return {(c, s): int(((labels[result.indices] == c) & (strata[result.indices] == s)).sum())
            for c in np.unique(labels) for s in np.unique(strata)}


def test_strata_follow_archive_proportions():
    X, labels, sites = strata_data()
    result = select("kcenter", X, labels, BUDGET, strata=sites)
    assert_valid(result, labels)
    for (c, s), taken in cell_counts(result, labels, sites).items():
        share = ((labels == c) & (sites == s)).sum() / (labels == c).sum()
        assert abs(taken - BUDGET * share) <= 1, (c, s, taken)
        assert result.info["classes"][c]["cells"][s]["budget"] == taken
    assert result.reason[0].startswith("stratum ")


def test_strata_min_per_stratum_is_honoured():
    X, labels, sites = strata_data()
    sites = sites.copy()
    sites[:2] = "tiny"  # a cell of two images in class a: gets both, not 4
    result = select("stratified", X, labels, BUDGET, strata=sites, min_per_stratum=4, seed=3)
    counts = cell_counts(result, labels, sites)
    assert counts[("a", "tiny")] == 2 and counts[("b", "tiny")] == 0
    assert all(n >= 4 for (c, s), n in counts.items() if s != "tiny")
    assert_valid(result, labels)
    short = select("stratified", X, labels, 5, strata=sites, min_per_stratum=4)
    assert any("too small for 4 per stratum" in note for note in short.info["notes"])


def test_strata_with_a_map_strategy_fill_every_row():
    X, labels, sites = strata_data()
    result = select("confounder-aware", X[:300], labels[:300], 10, strata=sites[:300])
    assert result.coords.shape == (300, 2) and (result.point_groups >= 0).all()
    assert_valid(result, labels[:300], budget=10)
    with pytest.raises(MedcurateError, match="one key per embedding row"):
        select("kcenter", X, labels, 5, strata=sites[:10])
