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

from medcurate.config import SelectConfig, Strategy
from medcurate.errors import MedcurateError
from medcurate.select import STRATEGIES, select, split_budget, strategy_params, validate_inputs
from medcurate.select.base import allocate, allocate_by_shares, herd
from medcurate.select.baselines import facility_location, herding, kcenter, random_uniform
from medcurate.select.confounder import confounder_aware, confounder_aware_paper, order_within

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
    """confounder-aware at N=20: map seed 0 on every class, then class0 alone with map seeds
    0 and 1 (each class's map seed derives from the map seed and its label, so class0 alone
    must repeat), then class0 with another selection seed and map seed 0."""
    X, labels, _ = data
    only = labels == "class0"
    return (confounder_aware(X, labels, BUDGET, seed=0),
            confounder_aware(X[only], labels[only], BUDGET, seed=0),
            confounder_aware(X[only], labels[only], BUDGET, seed=0, map_seed=1),
            confounder_aware(X[only], labels[only], BUDGET, seed=7))


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
    everything, alone, other_map, other_seed = confounder_runs
    only = labels == "class0"
    first = labels[everything.indices] == "class0"
    np.testing.assert_array_equal(everything.indices[first], alone.indices)
    np.testing.assert_array_equal(everything.coords[only], alone.coords)
    assert [r for r, f in zip(everything.reason, first) if f] == alone.reason
    assert not np.array_equal(alone.coords, other_map.coords)  # the map seed reaches the map
    np.testing.assert_array_equal(alone.coords, other_seed.coords)  # the selection seed not
    np.testing.assert_array_equal(alone.indices, other_seed.indices)  # herding: no draw


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
    # the default starts each group at its most typical image (herding in the embedding)
    assert "group 0 (" in result.reason[0] and "herding pick 1 of " in result.reason[0]
    assert result.info["params"]["within"] == "herding"
    assert result.info["params"]["distance_space"] == "embedding"
    assert result.info["params"]["allocation"] == "share"


def test_confounder_aware_768d():
    X, labels, sub = planted(n_per_class=200, d=768, classes=2, seed=3)
    result = confounder_aware(X, labels, BUDGET, seed=0)
    assert_valid(result, labels)
    for taken, rare in per_class_counts(result, labels, sub).values():
        assert 1 <= rare <= 3


# ---- allocation and balance on planted groups (one class of 508; one UMAP per run) -----------

MODES = [450, 20, 15, 15, 8]  # a dominant mode (89%), three small groups (3-4%), one of 1.6%


def modes(sizes=MODES, d=12, sep=20.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """One class of well-separated planted groups: the first at the origin, each other one
    ``sep`` along its own axis (a scanner, a site, a burned-in tag)."""
    rng = np.random.default_rng(seed)
    X, sub = [], []
    for g, n in enumerate(sizes):
        center = np.zeros(d)
        if g:
            center[g - 1] = sep
        X.append(center + rng.normal(size=(n, d)))
        sub += [g] * n
    return np.concatenate(X).astype(np.float32), np.array(sub)


@pytest.fixture(scope="module")
def modes_runs():
    """Default confounder-aware at N = 5 and N = 20, the paper's at N = 5."""
    X, sub = modes()
    labels = np.zeros(len(X), dtype=int)
    return X, labels, sub, {
        ("share", 5): confounder_aware(X, labels, 5, seed=0),
        ("share", 20): confounder_aware(X, labels, 20, seed=0),
        ("paper", 5): confounder_aware_paper(X, labels, 5, seed=0)}


def picks_per_group(result, sub) -> list[int]:
    return np.bincount(sub[result.indices], minlength=len(MODES)).tolist()


def test_modes_are_found_as_planted(modes_runs):
    from sklearn.metrics import adjusted_rand_score
    _, _, sub, runs = modes_runs
    for result in runs.values():
        assert adjusted_rand_score(sub, result.point_groups) > 0.95
        np.testing.assert_array_equal(result.point_groups[result.indices], result.group)


def test_share_keeps_the_dominant_mode_at_small_budget(modes_runs):
    _, labels, sub, runs = modes_runs
    result = runs[("share", 5)]
    assert_valid(result, labels, budget=5)
    counts = picks_per_group(result, sub)
    assert counts[0] >= int(5 * MODES[0] / sum(MODES))  # at least its proportional share (4)
    assert counts == [5, 0, 0, 0, 0]  # no small group earns half a pick of 5
    assert result.info["classes"]["0"]["allocation"] == [5, 0, 0, 0, 0]
    assert all("herding pick" in reason for reason in result.reason)


def test_share_gives_every_group_of_half_a_pick_its_own_at_larger_budget(modes_runs):
    _, labels, sub, runs = modes_runs
    result = runs[("share", 20)]
    assert_valid(result, labels, budget=20)
    counts = picks_per_group(result, sub)
    for group, size in enumerate(MODES):
        if size * 2 * 20 >= sum(MODES):  # share >= 1 / (2N)
            assert counts[group] >= 1, (group, counts)
    assert counts == [17, 1, 1, 1, 0]  # the 1.6% group earns no pick of 20
    # herding within the dominant mode: its first pick is the mode's most typical image
    mode = np.flatnonzero(sub == 0)
    X = modes_runs[0]
    nearest = mode[np.argmin(np.linalg.norm(X[mode] - X[mode].mean(axis=0), axis=1))]
    assert result.indices[0] == nearest
    assert result.reason[0].startswith("class 0, group 0 (450 imgs), herding pick 1 of 17 ")


def test_paper_strategy_gives_every_group_one_pick(modes_runs):
    _, labels, sub, runs = modes_runs
    result = runs[("paper", 5)]
    assert_valid(result, labels, budget=5)
    assert picks_per_group(result, sub) == [1, 1, 1, 1, 1]
    info = result.info
    assert info["strategy"] == "confounder-aware-paper"
    assert (info["params"]["allocation"], info["params"]["within"],
            info["params"]["distance_space"]) == ("paper", "quantile-mid", "map")
    assert all("distance rank" in reason for reason in result.reason)
    # one pick per group: the median distance from the group's centre in the map
    coords = result.coords
    for index in result.indices:
        members = np.flatnonzero(result.point_groups == result.point_groups[index])
        order = np.argsort(((coords[members] - coords[members].mean(axis=0)) ** 2).sum(1),
                           kind="stable")
        assert index == members[order[len(members) // 2]]


def correlated(n=200, d=12, seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes of ``n``: a confounder blob (20 along three axes) holds 90% of class a and
    10% of class b; the classes differ a little (1 along the last axis)."""
    rng = np.random.default_rng(seed)
    X, labels, conf = [], [], []
    for c, share in (("a", 0.9), ("b", 0.1)):
        is_conf = np.r_[np.ones(round(n * share), int), np.zeros(n - round(n * share), int)]
        rng.shuffle(is_conf)
        Z = rng.normal(size=(n, d))
        Z[:, -1] += 1.0 * (c == "b")
        Z[:, :3] += 20.0 * is_conf[:, None]
        X.append(Z)
        labels += [c] * n
        conf.append(is_conf)
    return np.concatenate(X).astype(np.float32), np.array(labels), np.concatenate(conf)


@pytest.fixture(scope="module")
def balance_runs():
    X, labels, conf = correlated()
    return X, labels, conf, {balance: confounder_aware(X, labels, 10, seed=0,
                                                       balance_groups=balance)
                             for balance in (True, False)}


def confounder_share(result, labels, conf) -> dict[str, float]:
    chosen = result.indices
    return {c: float(conf[chosen][labels[chosen] == c].mean()) for c in ("a", "b")}


def test_balance_groups_gives_every_class_the_same_mix(balance_runs):
    X, labels, conf, runs = balance_runs
    balanced, plain = runs[True], runs[False]
    assert_valid(balanced, labels, budget=10)
    assert_valid(plain, labels, budget=10)
    shares = confounder_share(balanced, labels, conf)
    assert abs(shares["a"] - shares["b"]) <= 0.15, shares
    assert abs(shares["a"] - 0.5) <= 0.15, shares  # the archive-wide share: 200 of 400
    mirrored = confounder_share(plain, labels, conf)  # without: the archive's correlation
    assert mirrored["a"] >= 0.8 and mirrored["b"] <= 0.2, mirrored


def test_balance_groups_records_one_map_and_each_class_split(balance_runs):
    X, labels, conf, runs = balance_runs
    result = runs[True]
    info = result.info
    assert info["params"]["balance_groups"] is True
    assert info["map"]["cluster"]["sizes"] == [200, 200]  # the confounder and the rest
    assert info["map"]["shares"] == [0.5, 0.5]
    assert "seed" in info["map"] and "reduce" in info["map"]
    assert any("balance_groups" in note for note in info["notes"])
    conf_group = int(np.bincount(result.point_groups[conf == 1]).argmax())
    for c, held in (("a", 180), ("b", 20)):
        cls = info["classes"][c]
        assert cls["group_sizes"][conf_group] == held
        assert cls["allocation"][conf_group] == 5 and sum(cls["allocation"]) == 10
    assert result.coords.shape == (len(X), 2) and (result.point_groups >= 0).all()
    np.testing.assert_array_equal(result.point_groups[result.indices], result.group)
    assert result.reason[0].startswith("class a, group ")



# ---- within-group ordering (no UMAP needed) ---------------------------------------------------

def test_order_within_quantile_spans_typical_to_atypical():
    P = np.column_stack([np.arange(1, 101, dtype=np.float32), np.zeros(100, np.float32)])
    P -= P.mean(axis=0)  # distance to the centre = |x|, ranks known
    ranks = np.argsort(np.argsort(np.abs(P[:, 0]), kind="stable"), kind="stable")
    # quantile: ranks floor(i m / k), the most central first
    chosen, reasons = order_within(P, 4, "quantile")
    np.testing.assert_array_equal(ranks[chosen], [0, 25, 50, 75])
    assert reasons[0] == "distance rank 1 of 100 (quantile 0.01)"
    assert reasons[1] == "distance rank 26 of 100 (quantile 0.26)"
    central, _ = order_within(P, 1, "quantile")
    assert ranks[central[0]] == 0
    assert len(set(order_within(P, 100, "quantile")[0].tolist())) == 100  # k = m: all
    # quantile-mid (the paper's): the mid-points of k equal rank bins
    chosen, reasons = order_within(P, 4, "quantile-mid")
    np.testing.assert_array_equal(ranks[chosen], [12, 37, 62, 87])
    assert reasons[0] == "distance rank 13 of 100 (quantile 0.12)"
    median, _ = order_within(P, 1, "quantile-mid")
    assert ranks[median[0]] == 50
    assert len(set(order_within(P, 100, "quantile-mid")[0].tolist())) == 100


def test_one_pick_is_the_most_typical_except_for_the_paper_median():
    """With one pick, herding and quantile take the point nearest the group's mean;
    quantile-mid takes the median-distance one (the paper's single pick)."""
    rng = np.random.default_rng(4)
    P = rng.normal(size=(101, 8)).astype(np.float32)
    P[3] += 6  # an outlier pulls the mean off the densest point: the mean matters, not density
    distances = np.linalg.norm(P - P.mean(axis=0, dtype=np.float64), axis=1)
    order = np.argsort(distances)
    assert len(np.unique(np.round(distances, 5))) == 101  # no ties: the answers are unique
    for within in ("herding", "quantile", "nearest", "farthest"):
        chosen, reasons = order_within(P, 1, within)
        assert chosen.tolist() == [order[0]], within
    chosen, reasons = order_within(P, 1, "herding")
    assert reasons[0].startswith("herding pick 1 of 1 (mean of picks ")
    chosen, reasons = order_within(P, 1, "quantile-mid")
    assert chosen.tolist() == [order[50]]
    assert reasons == ["distance rank 51 of 101 (quantile 0.50)"]


def test_herd_matches_the_mean_and_never_repeats():
    rng = np.random.default_rng(1)
    P = rng.normal(size=(60, 5)).astype(np.float32)
    picks, gaps = herd(P, 60)
    assert sorted(picks.tolist()) == list(range(60)) and picks.dtype == np.int64
    assert gaps[-1] == pytest.approx(0.0, abs=1e-6)  # all picked: the means agree
    mean = P.mean(axis=0, dtype=np.float64)
    assert picks[0] == np.argmin(np.linalg.norm(P - mean, axis=1))
    # each prefix's mean is at least as close to the mean as any single swap of its last pick
    for t in (2, 5, 10):
        prefix = picks[:t]
        best = min(np.linalg.norm(mean - (P[prefix[:-1]].sum(0) + P[j]) / t)
                   for j in range(60) if j not in prefix[:-1])
        assert gaps[t - 1] == pytest.approx(best, rel=1e-5)
    first5, _ = herd(P, 5)
    np.testing.assert_array_equal(first5, picks[:5])  # greedy: a prefix of the longer run


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


@pytest.mark.parametrize("within", ["herding", "quantile", "quantile-mid", "nearest", "farthest"])
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

# ---- allocate: the split of a class's budget over its groups ------------------------------------

def test_allocate_share_keeps_the_main_mode_where_the_paper_spreads_thin():
    sizes = [600, 6, 5, 5, 5, 40]  # the example; the last group is DBSCAN's noise
    assert allocate(sizes, 5, noise_group=5) == [5, 0, 0, 0, 0, 0]
    assert allocate(sizes, 5, rule="paper", noise_group=5) == [1, 1, 1, 1, 0, 1]
    assert allocate(sizes, 5, rule="paper") == split_budget(sizes, 5)
    assert allocate({"a": 90, "b": 10}, 5) == {"a": 4, "b": 1}  # shape kept


def test_allocate_share_guarantees_a_pick_from_half_a_pick_on():
    # size >= class size / (2 budget): 10 >= 100 / 10 earns a pick at N = 5, 9 does not
    assert allocate([90, 10], 5) == [4, 1]
    assert allocate([91, 9], 5) == [5, 0]
    assert allocate([90, 10], 4) == [4, 0]  # 10 < 100 / 8
    assert allocate([80, 10, 10], 5) == [3, 1, 1]
    # at N = 20 every group of at least 500 / 40 = 12.5 earns one; the 8-group does not
    assert allocate([450, 20, 15, 15, 8], 20) == [17, 1, 1, 1, 0]
    assert allocate([450, 20, 15, 15, 8], 20, rule="paper") == [16, 1, 1, 1, 1]


def test_allocate_share_never_guarantees_the_noise_group():
    assert allocate([90, 10], 5, noise_group=1) == [5, 0]  # 10% of noise: no pick by right
    assert allocate([90, 10], 5, noise_group=None) == [4, 1]
    assert allocate([50, 50], 10, noise_group=1) == [5, 5]  # but its proportional share
    assert allocate([90, 10], 5, noise_group=7) == [4, 1]  # an id past the groups: no noise


def test_allocate_share_is_proportional_when_the_guarantees_outnumber_the_budget():
    sizes = [26, 25, 25, 24]  # three earn a pick at N = 2 (>= 25): too many to guarantee
    assert allocate(sizes, 2) == split_budget(sizes, 2, minimum=0) == [1, 1, 0, 0]
    assert allocate([30, 30, 30, 10], 2) == [1, 1, 0, 0]
    assert allocate([100, 1], 20) == [20, 0]


def test_allocate_totals_and_caps_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(400):
        sizes = rng.integers(0, 80, size=rng.integers(1, 9)).tolist()
        budget = int(rng.integers(0, 60))
        noise = int(rng.integers(0, len(sizes))) if rng.random() < 0.5 else None
        target = min(budget, sum(sizes))
        for rule in ("share", "paper"):
            alloc = allocate(sizes, budget, rule=rule, noise_group=noise)
            assert sum(alloc) == target, (sizes, budget, rule)
            assert all(0 <= a <= s for a, s in zip(alloc, sizes)), (sizes, budget, rule)
        share = allocate(sizes, budget, noise_group=noise)
        earned = [g for g, s in enumerate(sizes)
                  if g != noise and s and 2 * max(target, 1) * s >= sum(sizes)]
        if len(earned) <= target:
            assert all(share[g] >= 1 for g in earned), (sizes, budget, noise, share)
        else:
            assert share == split_budget(sizes, budget, minimum=0)


def test_allocate_rejects_bad_input():
    with pytest.raises(MedcurateError, match="unknown allocation 'even'; known: share, paper"):
        allocate([3, 1], 2, rule="even")
    with pytest.raises(MedcurateError, match="non-negative"):
        allocate([3, -1], 2)
    with pytest.raises(MedcurateError, match="budget"):
        allocate([3, 1], -2)


def test_allocate_by_shares_caps_and_redistributes():
    assert allocate_by_shares([0.5, 0.5], [180, 20], 10) == [5, 5]
    assert allocate_by_shares([0.5, 0.5], [180, 3], 10) == [7, 3]  # capped: surplus moves
    assert allocate_by_shares([0.9, 0.1], [3, 100], 10) == [3, 7]
    assert allocate_by_shares([1, 0], [2, 10], 5) == [2, 3]  # no share left: any room
    assert allocate_by_shares([1, 1, 1], [50, 50, 50], 10) == [4, 3, 3]  # largest remainder
    assert allocate_by_shares([0.6, 0.3, 0.1], [4, 4, 4], 50) == [4, 4, 4]  # all of it
    assert allocate_by_shares([0.2, 0.8], [0, 9], 5) == [0, 5]  # a class without the group
    rng = np.random.default_rng(1)
    for _ in range(300):
        parts = int(rng.integers(1, 7))
        shares = rng.random(parts) * (rng.random(parts) < 0.8)
        capacity = rng.integers(0, 30, size=parts)
        budget = int(rng.integers(0, 80))
        alloc = allocate_by_shares(shares, capacity, budget)
        assert sum(alloc) == min(budget, int(capacity.sum())), (shares, capacity, budget)
        assert all(0 <= a <= c for a, c in zip(alloc, capacity)), (shares, capacity, budget)
        if capacity.min() >= budget and shares.sum() > 0:  # no cap binds: proportional ±1
            quota = budget * shares / shares.sum()
            assert np.all(np.abs(np.asarray(alloc) - quota) < 1 + 1e-9), (shares, alloc)


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
    with pytest.raises(MedcurateError,
                       match="known: confounder-aware, confounder-aware-paper, random, stratified"):
        select("best", np.ones((4, 2)), np.zeros(4), 1)
    with pytest.raises(MedcurateError, match="kcenter takes no parameter eps"):
        select("kcenter", np.ones((4, 2)), np.zeros(4), 1, eps=0.3)
    with pytest.raises(MedcurateError, match="unknown within"):
        select("confounder-aware", np.ones((4, 2)), np.zeros(4), 1, within="middle")
    with pytest.raises(MedcurateError, match="unknown allocation 'even'"):
        select("confounder-aware", np.ones((4, 2)), np.zeros(4), 1, allocation="even")
    with pytest.raises(MedcurateError, match="unknown distance_space"):
        select("confounder-aware", np.ones((4, 2)), np.zeros(4), 1, distance_space="pixels")
    # the paper's method is fixed: its allocation and within-group rule are not parameters
    with pytest.raises(MedcurateError, match="confounder-aware-paper takes no parameter within"):
        select("confounder-aware-paper", np.ones((4, 2)), np.zeros(4), 1, within="herding")
    assert strategy_params("facility-location") == {"n_neighbors": 20}
    defaults = strategy_params("confounder-aware")
    assert (defaults["within"], defaults["distance_space"], defaults["allocation"],
            defaults["balance_groups"]) == ("herding", "embedding", "share", False)
    assert not {"within", "allocation", "distance_space", "balance_groups"} & \
        set(strategy_params("confounder-aware-paper"))


def test_config_knows_every_strategy_and_the_new_parameters():
    assert set(STRATEGIES) <= set(Strategy.__args__)
    config = SelectConfig(embedding_run="r", budget_per_class=5, allocation="paper",
                          within="quantile-mid", balance_groups=True)
    assert config.strategy_params() == {"within": "quantile-mid", "allocation": "paper",
                                        "balance_groups": True}
    assert "balance_groups" not in SelectConfig(embedding_run="r",
                                                budget_per_class=5).strategy_params()
    SelectConfig(embedding_run="r", budget_per_class=5, strategy="confounder-aware-paper")


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
