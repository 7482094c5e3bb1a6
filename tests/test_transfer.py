"""Transferability metrics: their defining properties, the paper's LP/FU, the zoo file, and the
reproduction of the published evaluation of Juodelyte et al. from their result tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg, special, stats
from torch import nn

from medcurate.errors import MedcurateError
from medcurate.transfer import metrics as m
from medcurate.transfer.evaluate import (PAPER, evaluate_published, metric_agreement,
                                         rank_metrics, read_rank_table)
from medcurate.transfer.paper import fu_score, lp_score, paper_score, triplet_margin_loss
from medcurate.transfer.probe import probe_indices
from medcurate.transfer.registry import METRICS, parse_metrics
from medcurate.transfer.zoo import load_zoo, source_classifier

torch.set_num_threads(2)
REFERENCE = (Path(__file__).resolve().parents[1].parent / "shared" / "reference"
             / "transferability-in-medical-imaging")

FEATURE_METRICS = {
    "logme": m.logme, "nleep": m.nleep, "hscore": m.hscore, "hscore-reg": m.regularized_hscore,
    "sfda": m.sfda, "parc": m.parc, "gbc": m.gbc, "transrate": m.transrate, "lp": lp_score,
    "ncti-ncc": lambda f, y: m.ncti_terms(f, y)[1],
}
SOURCE_METRICS = {"leep": m.leep, "leep:prob": lambda p, y: m.leep(p, y, "prob"), "nce": m.nce}


def _clusters(seed: int = 1, n: int = 150, d: int = 10, classes: int = 3, shift: float = 3.0):
    """Gaussian features whose class means differ: labels are predictable from them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    features = rng.normal(size=(n, d)) + shift * np.eye(classes, d)[labels]
    return features, labels, rng


def _source_probs(labels: np.ndarray, rng, source_classes: int = 7) -> np.ndarray:
    """Noisy source-task predictions that carry information about the labels."""
    logits = rng.normal(size=(labels.size, source_classes))
    logits[np.arange(labels.size), labels] += 2.0
    return m.softmax(logits)


# -- defining properties ---------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 5])
def test_leep_of_perfect_source_predictions_is_zero(classes):
    labels = np.random.default_rng(0).integers(0, classes, 200)
    perfect = np.eye(classes)[labels]
    assert m.leep(perfect, labels) == pytest.approx(0.0, abs=1e-9)
    assert m.leep(perfect, labels, variant="prob") == pytest.approx(1.0)
    assert m.nce(perfect, labels) == pytest.approx(0.0, abs=1e-12)
    # More source classes than target classes, each source class inside one target class.
    finer = np.eye(2 * classes)[2 * labels + np.arange(labels.size) % 2]
    assert m.leep(finer, labels) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("classes", [2, 4, 10])
def test_leep_of_uniform_source_predictions_is_log_one_over_c(classes):
    labels = np.repeat(np.arange(classes), 30)
    uniform = np.full((labels.size, 50), 1 / 50)
    assert m.leep(uniform, labels) == pytest.approx(np.log(1 / classes))
    assert m.leep(uniform, labels, variant="prob") == pytest.approx(1 / classes)
    assert m.nce(uniform, labels) == pytest.approx(np.log(1 / classes))


def test_hscore_of_random_features_is_near_zero():
    rng = np.random.default_rng(3)
    features, labels = rng.normal(size=(4000, 8)), rng.integers(0, 3, 4000)
    assert abs(m.hscore(features, labels)) < 0.02
    assert abs(m.regularized_hscore(features, labels)) < 0.02
    informative, labels, _ = _clusters()
    assert m.hscore(informative, labels) > 1.0  # at most C - 1 = 2


def test_gbc_stays_within_its_bounds():
    classes = 4
    separated, labels, rng = _clusters(classes=classes, n=200, shift=30.0)
    identical = rng.normal(size=(4000, 6))
    same_labels = np.arange(4000) % classes
    floor = -classes * (classes - 1)
    for variant in m.GBC_VARIANTS:
        far = m.gbc(separated, labels, variant=variant)
        overlapping = m.gbc(identical, same_labels, variant=variant)
        assert floor <= overlapping < far <= 0
        assert far == pytest.approx(0.0, abs=1e-6)
        assert overlapping == pytest.approx(floor, rel=0.01)


def test_logme_is_larger_for_separable_than_for_shuffled_labels():
    features, labels, rng = _clusters()
    assert m.logme(features, labels) > m.logme(features, rng.permutation(labels)) + 0.2
    # Also where the probe has fewer samples than feature dimensions (the usual case).
    wide, labels, rng = _clusters(n=60, d=300)
    assert m.logme(wide, labels) > m.logme(wide, rng.permutation(labels))


@pytest.mark.parametrize("name", list(FEATURE_METRICS))
def test_feature_metrics_rank_informative_features_above_shuffled_labels(name):
    features, labels, rng = _clusters()
    metric = FEATURE_METRICS[name]
    assert metric(features, labels) > metric(features, rng.permutation(labels))


@pytest.mark.parametrize("name", list(SOURCE_METRICS))
def test_source_metrics_rank_informative_predictions_above_shuffled_labels(name):
    _, labels, rng = _clusters()
    probs, metric = _source_probs(labels, rng), SOURCE_METRICS[name]
    assert metric(probs, labels) > metric(probs, rng.permutation(labels))


@pytest.mark.parametrize("name", [*FEATURE_METRICS, *SOURCE_METRICS, "ncti-terms"])
def test_every_metric_ignores_the_order_of_samples(name):
    features, labels, rng = _clusters(n=90, d=20)
    labels = np.array(["benign", "malignant", "normal"])[labels]  # any label values
    if name in SOURCE_METRICS:
        matrix, metric = _source_probs(np.unique(labels, return_inverse=True)[1], rng), \
            SOURCE_METRICS[name]
    else:
        matrix, metric = features, FEATURE_METRICS.get(name, m.ncti_terms)
    order = rng.permutation(labels.size)
    assert np.allclose(metric(matrix, labels), metric(matrix[order], labels[order]),
                       rtol=1e-9, atol=1e-12)


def test_ncti_combines_terms_across_the_zoo_with_either_sign():
    terms = [[10.0, 0.9, 2.0], [5.0, 0.5, 1.0], [0.0, 0.7, 3.0]]
    # Normalised across the three models: seli [1, .5, 0], ncc [1, 0, .5], vc [.5, 0, 1].
    assert np.allclose(m.ncti(terms), [1 + 1 - 0.5, 0.5 + 0 - 0, 0 + 0.5 - 1])
    assert np.allclose(m.ncti(terms, "plus"), [1 + 1 + 0.5, 0.5 + 0 + 0, 0 + 0.5 + 1])
    with pytest.raises(MedcurateError, match="variant"):
        m.ncti(terms, "times")


def test_bad_metric_input_is_a_clear_error():
    features, labels, _ = _clusters()
    with pytest.raises(MedcurateError, match="two target classes"):
        m.logme(features, np.zeros(len(labels)))
    with pytest.raises(MedcurateError, match="one row per label"):
        m.parc(features[:-1], labels)
    with pytest.raises(MedcurateError, match="variants: log, prob"):
        m.leep(np.full((len(labels), 3), 1 / 3), labels, variant="ln")
    with pytest.raises(MedcurateError, match="NaN"):
        m.transrate(np.where(features > 2, np.nan, features), labels)


# -- parity with the reference implementations ----------------------------------------------------
# Each port below restates a published rule in a few lines (thuml/LogME, Transfer-Learning-Library
# tllib/ranking, TencentARC/SFDA metrics.py); labels are codes 0..C-1 as those functions expect.
def _thuml_logme(f, y):
    """thuml/LogME's fixed point: 11 steps, tolerance 1e-3, 1e-5 in the denominators, D."""
    n, d = f.shape
    if n > d:  # singular values from F^T F, those above 1e-10
        _, s2, vh = np.linalg.svd(f.T @ f)
        k = int((np.sqrt(s2) > 1e-10).sum())
        u, sigma = f @ vh[:k].T / np.sqrt(s2[:k]), np.sqrt(s2[:k]) ** 2
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        sigma = s ** 2
    evidences = []
    for c in range(y.max() + 1):
        target = (y == c).astype(np.float64)
        x2 = (u.T @ target) ** 2
        rest = target @ target - x2.sum()
        alpha = beta = 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + rest
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidences.append((d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                          - 0.5 * np.log(alpha + beta * sigma).sum() - beta / 2 * res2
                          - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n)
    return np.mean(evidences)


def _tllib_leep(p, y):
    joint = np.stack([p[y == c].sum(axis=0) for c in range(y.max() + 1)]) / len(y)
    return np.log((p @ (joint / joint.sum(axis=0)).T)[np.arange(len(y)), y]).mean()


def _tllib_nce(p, y):
    joint = np.zeros((y.max() + 1, p.shape[1]))
    np.add.at(joint, (y, p.argmax(axis=1)), 1 / len(y))
    p_z = joint.sum(axis=0)
    seen = p_z != 0
    cond = joint[:, seen] / p_z[seen] + 1e-20
    return (p_z[seen] * (cond * np.log(cond)).sum(axis=0)).sum()


def _tllib_hscore(f, y, regularized: bool):
    shrinkage, cov_f = 0.0, np.cov(f, rowvar=False)
    if regularized:
        from sklearn.covariance import LedoitWolf

        f = f - f.mean(axis=0)
        fitted = LedoitWolf().fit(f)
        shrinkage, cov_f = fitted.shrinkage_, fitted.covariance_
    g = np.stack([f[y == c].mean(axis=0) for c in range(y.max() + 1)])[y]
    return np.trace(np.linalg.pinv(cov_f, rcond=1e-15)
                    @ ((1 - shrinkage) * np.cov(g, rowvar=False)))


def _tllib_transrate(f, y, eps=1e-4):
    def rate(z):
        return 0.5 * np.linalg.slogdet(np.eye(z.shape[1]) + z.T @ z / (len(z) * eps))[1]

    f = f - f.mean(axis=0)
    return rate(f) - sum(rate(f[y == c]) for c in range(y.max() + 1)) / (y.max() + 1)


def _sfda_fisher(x, y, shrinkage):
    """SFDA's Fisher discriminant: generalised eigenvectors of (S_t - S_w, S_w), both shrunk;
    adaptive shrinkage from three power-iteration steps on S_w."""
    priors = np.bincount(y) / len(y)
    means = np.stack([x[y == c].mean(axis=0) for c in range(y.max() + 1)])
    within = sum(priors[c] * np.cov(x[y == c].T, bias=True) for c in range(y.max() + 1))
    if shrinkage is None:
        v = within.sum(axis=1)
        for _ in range(3):
            w = within @ v / np.linalg.norm(within @ v)
            v = within @ w / np.linalg.norm(within @ w)
        shrinkage = max(np.exp(-5 * v @ within @ w), 1e-10)

    def shrunk(cov):
        return (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))

    _, vectors = linalg.eigh(shrunk(np.cov(x.T, bias=True)) - shrunk(within), shrunk(within))
    coef = means @ vectors @ vectors.T
    return special.softmax(x @ coef.T - 0.5 * np.diag(means @ coef.T) + np.log(priors),
                           axis=1), shrinkage


def _sfda_score(x, y):
    rows = np.arange(len(y))
    probs, shrinkage = _sfda_fisher(x, y, None)
    sure = special.softmax(probs, axis=1)[rows, y][:, None]
    means = np.stack([x[y == c].mean(axis=0) for c in range(y.max() + 1)])
    others = (means.sum(axis=0) - means) / (len(means) - 1)
    return _sfda_fisher(sure * x + (1 - sure) * others[y], y, shrinkage)[0][rows, y].mean()


def _sfda_nleep(x, y, seed):
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    reduced = PCA(n_components=0.8).fit(x).transform(x)
    probs = GaussianMixture(5 * (y.max() + 1), random_state=seed).fit(reduced) \
        .predict_proba(reduced)
    return _sfda_leep(probs, y)


def _sfda_leep(p, y):
    """SFDA's LEEP: the mean expected empirical prediction of the true class, without the log."""
    joint = np.stack([p[y == c].sum(axis=0) for c in range(y.max() + 1)]) / len(y)
    return (p @ (joint / joint.sum(axis=0)).T)[np.arange(len(y)), y].mean()


def _sfda_parc(x, y, label_rdm, **pca):
    """SFDA's PARC; ``pca`` the solver options (default: its randomised PCA)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    pca = pca or {"svd_solver": "randomized", "random_state": 1919, "iterated_power": 1}
    reduced = PCA(n_components=min(32, len(x)), **pca).fit_transform(x)
    upper = np.triu_indices(len(x), 1)
    feature_rdm = 1 - np.corrcoef(StandardScaler().fit_transform(reduced))
    return stats.spearmanr(feature_rdm[upper], label_rdm[upper]).statistic * 100


def _canonical(features, labels):
    """Rows in the order m.order_invariant puts them: a port then sees what the metric sees."""
    order = np.lexsort([*features.T[::-1], labels])
    return features[order], labels[order]


def _tall_and_wide():
    """A probe with more samples than dimensions (large features, so small weights, where
    LogME's 1e-5 in the denominators tells), and one with fewer (the usual case)."""
    tall, tall_labels, _ = _clusters(n=150, d=10)
    tall = 100 * tall
    wide, wide_labels, _ = _clusters(seed=2, n=60, d=120, shift=1.5)
    return [(tall, tall_labels), (wide, wide_labels)]


def test_logme_reference_is_thuml_fixed_point_and_differs_from_the_exact_evidence():
    for features, labels in _tall_and_wide():
        reference = m.logme(features, labels, "reference")
        assert reference == pytest.approx(_thuml_logme(features, labels), rel=1e-10)
        assert abs(reference - m.logme(features, labels)) > 1e-3
    # N < D: the fixed point needs 38 to 48 steps here to reach even the reference's tolerance
    # (76 to 98 to ours); the reference stops at 11 and adds (D - N)/2 log(alpha) / N that the
    # evidence does not have.
    wide, labels = _tall_and_wide()[1]
    assert m.logme(wide, labels, "reference") - m.logme(wide, labels) > 1.0


def test_leep_nce_hscore_and_transrate_equal_tllib_and_sfda_code():
    features, labels, rng = _clusters(n=150, d=10)
    probs = _source_probs(labels, rng)
    assert m.leep(probs, labels) == pytest.approx(_tllib_leep(probs, labels), rel=1e-12)
    assert m.leep(probs, labels, "prob") == pytest.approx(_sfda_leep(probs, labels), rel=1e-12)
    assert m.nce(probs, labels) == pytest.approx(_tllib_nce(probs, labels), rel=1e-12)
    assert m.hscore(features, labels) == pytest.approx(
        _tllib_hscore(features, labels, regularized=False), rel=1e-10)
    assert m.transrate(features, labels) == pytest.approx(_tllib_transrate(features, labels),
                                                          rel=1e-10)


def test_regularized_hscore_reference_is_tllibs_n_minus_one():
    for features, labels in _tall_and_wide():
        reference = m.regularized_hscore(features, labels, "reference")
        assert reference == pytest.approx(
            _tllib_hscore(features, labels, regularized=True), rel=1e-10)
        n = len(labels)
        assert reference == pytest.approx(m.regularized_hscore(features, labels) * n / (n - 1),
                                          rel=1e-12)


def test_sfda_reference_shrinks_with_three_power_steps():
    # Within-class eigenvalues near 0.1 and close together: the power iteration underestimates
    # the largest, so the shrinkage exp(-5 lambda) is visibly larger than with the exact one.
    features, labels, _ = _clusters(n=150, d=10, shift=1.0)
    features = 0.3 * features
    reference = m.sfda(features, labels, "reference")
    assert reference == pytest.approx(_sfda_score(features, labels), rel=1e-10)
    assert abs(reference - m.sfda(features, labels)) > 1e-6


def test_nleep_reference_is_the_sfda_code():
    features, labels = _canonical(*_clusters(n=150, d=10)[:2])
    reference = m.nleep(features, labels, "reference", seed=3)
    assert reference == pytest.approx(_sfda_nleep(features, labels, seed=3), rel=1e-10)
    # Its covariance floor is 1e-6 whatever the scale, ours 1e-6 x the mean PCA variance (> 1
    # here), so the mixtures differ a little; on features of variance below 1 the floors agree.
    assert abs(reference - m.nleep(features, labels, "prob", seed=3)) > 1e-8
    small = 0.1 * features
    assert m.nleep(small, labels, "reference", seed=3) == pytest.approx(
        m.nleep(small, labels, "prob", seed=3), rel=1e-12)


def test_parc_reference_is_the_sfda_code_with_exact_label_dissimilarity():
    features, labels = _canonical(*_clusters(n=90, d=200)[:2])
    exact_labels = (labels[:, None] != labels[None, :]).astype(np.float64)
    reference = m.parc(features, labels, "reference")
    assert reference == pytest.approx(_sfda_parc(features, labels, exact_labels), rel=1e-10)
    assert abs(reference - m.parc(features, labels)) > 1e-3
    assert m.parc(features, labels) == pytest.approx(
        _sfda_parc(features, labels, exact_labels, svd_solver="full"), rel=1e-10)
    # 1 - corrcoef(one-hot), as the published code writes it, leaves ~1e-16 residues within a
    # class (three classes here); they split Spearman's ties and move the value.
    residues = 1 - np.corrcoef(np.eye(3)[labels])
    assert len(np.unique(residues[np.triu_indices(len(labels), 1)])) > 2
    assert reference != pytest.approx(_sfda_parc(features, labels, residues), rel=1e-10)


# -- the paper's LP and FU -------------------------------------------------------------------------
def test_lp_handles_features_with_fewer_dimensions_than_components():
    features, labels, rng = _clusters(d=3)
    assert 0.9 < lp_score(features, labels) <= 1.0
    assert lp_score(features, rng.permutation(labels)) < 0.7


def test_triplet_loss_averages_the_non_zero_triplets():
    # Unit vectors at angles 0, 10, 90 and 180 degrees; labels a, a, b, b.
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 90.0, 180.0]))
    points = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * 3  # scale is ignored
    labels = torch.tensor([0, 0, 1, 1])

    def distance(i: int, j: int) -> float:
        return float(torch.dist(points[i] / 3, points[j] / 3))

    valid = [(a, p, n) for a in range(4) for p in range(4) for n in range(4)
             if a != p and labels[a] == labels[p] and labels[n] != labels[a]]
    losses = [max(distance(a, p) - distance(a, n) + 0.05, 0.0) for a, p, n in valid]
    expected = np.mean([loss for loss in losses if loss > 0])
    assert float(triplet_margin_loss(points, labels)) == pytest.approx(expected, rel=1e-5)
    apart = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]])
    assert triplet_margin_loss(apart, labels) is None  # every triplet already satisfied


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_fu_is_the_ratio_of_second_to_first_layer_gradient_norms():
    torch.manual_seed(1)
    images, labels = torch.randn(36, 3, 12, 12), np.arange(36) % 3
    net = _tiny_cnn()
    value = fu_score(net, "0", "2", lambda idx: images[idx], labels, chunk=4)
    # The same by hand: whole batches of 36 // 6 = 6 images, one backward pass each.
    norms = []
    for start in range(0, 36, 6):
        net.zero_grad()
        loss = triplet_margin_loss(net(images[start:start + 6]),
                                   torch.as_tensor(labels[start:start + 6]))
        if loss is not None:
            loss.backward()
            norms.append([float(net[0].weight.grad.norm()), float(net[2].weight.grad.norm())])
    expected = np.mean(norms, axis=0)
    assert value == pytest.approx(expected[1] / expected[0], rel=1e-4)
    with torch.no_grad():  # cached features (as the embedding pipeline keeps them) give the same
        cached = net(images).numpy()
    assert fu_score(net, "0", "2", lambda idx: images[idx], labels, embeddings=cached) == \
        pytest.approx(value, rel=1e-4)
    with pytest.raises(MedcurateError, match="at least 18"):
        fu_score(net, "0", "2", lambda idx: images[idx], labels[:12])


def test_paper_score_is_the_product_of_min_max_normalised_parts():
    assert np.allclose(paper_score([0.5, 0.7, 0.9], [3.0, 1.0, 2.0]), [0.0, 0.0, 0.5])
    assert np.isnan(paper_score([0.5, 0.5], [1.0, 2.0])).all()  # LP cannot tell them apart


# -- published tables ------------------------------------------------------------------------------
PUBLISHED_TAU = {"bloodmnist": 0.777388, "breastmnist": 0.440759, "dermamnist": 0.701932,
                 "octmnist": 0.452072, "organamnist": 0.566029, "organcmnist": 0.108590,
                 "organsmnist": 0.219208, "pathmnist": 0.615297, "pneumoniamnist": 0.612253,
                 "retinamnist": 0.602210, "tissuemnist": 0.652513}


@pytest.fixture(scope="module")
def published():
    if not (REFERENCE / "lp_dataset.csv").is_file():
        pytest.skip(f"{REFERENCE} is absent: the published result tables of Juodelyte et al. "
                    "are needed to reproduce their evaluation")
    return evaluate_published(REFERENCE, "dataset")


def test_reproduces_the_papers_weighted_tau_per_target(published):
    assert {t: round(v, 6) for t, v in published[PAPER].items()} == PUBLISHED_TAU


def test_reproduces_the_published_rank_table_of_metrics(published):
    assert rank_metrics(published) == read_rank_table(REFERENCE / "ktau_dataset_rank.csv")


# -- metric agreement, probe, zoo and metric names -------------------------------------------------
def test_metric_agreement_is_kendall_tau_between_metrics():
    values = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([3.0, 2.0, 1.0]),
              "c": np.array([np.nan, 1.0, np.nan])}
    matrix = metric_agreement(values)
    assert matrix["a"]["a"] == 1.0 and matrix["a"]["b"] == -1.0
    assert matrix["a"]["c"] is None  # one model scored by both: no ranking to compare


def test_probe_is_stratified_seeded_and_mixes_classes():
    labels = ["a"] * 50 + ["b"] * 50 + ["c"] * 5 + [None] * 3 + ["a"] * 20
    splits = ["train"] * 108 + ["test"] * 20
    first = probe_indices(labels, splits, per_class=10, seed=24)
    assert np.array_equal(first, probe_indices(labels, splits, per_class=10, seed=24))
    assert not np.array_equal(np.sort(first), np.sort(probe_indices(labels, splits, 10, 25)))
    picked = [labels[i] for i in first]
    assert sorted(picked) == ["a"] * 10 + ["b"] * 10 + ["c"] * 5  # a small class taken whole
    assert all(splits[i] == "train" for i in first)
    assert picked[:10] != sorted(picked[:10])  # not class by class: FU batches mix classes


def test_parse_metrics_names_variants_and_rejects_unknown_ones():
    assert [r.column for r in parse_metrics(["all"])] == list(METRICS)
    requests = parse_metrics(["lp", "leep:prob", "leep:log", "ncti:plus", "lp"])
    assert [r.column for r in requests] == ["lp", "leep:prob", "leep", "ncti:plus"]
    requests = parse_metrics(["logme:reference", "logme:exact", "parc:reference"])
    assert [r.column for r in requests] == ["logme:reference", "logme", "parc:reference"]
    with pytest.raises(MedcurateError, match="unknown metric 'accuracy'"):
        parse_metrics(["accuracy"])
    with pytest.raises(MedcurateError, match="its variants: minus, plus"):
        parse_metrics(["ncti:times"])
    with pytest.raises(MedcurateError, match="no variants"):
        parse_metrics(["hscore:fast"])


def test_zoo_file_resolves_paths_and_rejects_bad_entries(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {name: a, model: mobilenetv2-imagenet, weights: w/a.pth}\n"
                   "  - {name: b, model: 'mae:ckpt/b.pt'}\n")
    entries = load_zoo(str(zoo))
    assert entries[0].weights == str(tmp_path / "w" / "a.pth")
    assert entries[1].model == f"mae:{tmp_path / 'ckpt' / 'b.pt'}"
    cases = {
        "- {name: a, model: x}\n- {name: a, model: y}\n": "unique",
        "- {name: a, model: x}\n": "ranking needs two",
        "- {name: a, model: x, preprocessing: {size: 64}}\n- {name: b, model: y}\n":
            r"unknown key\(s\) preprocessing",
        "- {name: a}\n- {name: b, model: y}\n": "non-empty string 'model'",
        "models: [a, b\n": "not valid YAML",
        "just text\n": "must hold a list",
    }
    for text, message in cases.items():
        zoo.write_text(text)
        with pytest.raises(MedcurateError, match=message):
            load_zoo(str(zoo))
    with pytest.raises(MedcurateError, match="zoo file not found"):
        load_zoo(str(tmp_path / "missing.yaml"))


def test_source_classifier_is_the_imagenet_head_or_none():
    from medcurate.models import create_encoder

    weight, bias = source_classifier(create_encoder("mobilenetv2-imagenet"))
    assert weight.shape == (1000, 1280) and bias.shape == (1000,)
    assert source_classifier(create_encoder("random/mobilenetv2")) is None


def test_relative_fu_divides_each_layers_gradient_norm_by_its_weight_norm():
    torch.manual_seed(1)
    images, labels = torch.randn(36, 3, 12, 12), np.arange(36) % 3
    net = _tiny_cnn()
    value = fu_score(net, "0", "2", lambda idx: images[idx], labels, relative=True)
    # By hand: each batch's gradient wrt both weights, norms over weight norms, batch means.
    first, second = net[0].weight, net[2].weight
    ratios = []
    for start in range(0, 36, 6):
        loss = triplet_margin_loss(net(images[start:start + 6]),
                                   torch.as_tensor(labels[start:start + 6]))
        if loss is not None:
            grads = torch.autograd.grad(loss, [first, second])
            ratios.append([float(g.norm() / w.detach().norm())
                           for g, w in zip(grads, (first, second))])
    expected = np.mean(ratios, axis=0)
    assert value == pytest.approx(expected[1] / expected[0], rel=1e-6)
    assert value != pytest.approx(fu_score(net, "0", "2", lambda idx: images[idx], labels))


def _conv_bn_net(scale: float) -> nn.Module:
    """A conv then BatchNorm (eval mode, fixed statistics), the first conv scaled by ``scale``
    and the BatchNorm's mean, variance and eps with it: the same function for every scale."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[1].running_mean.copy_(torch.randn(8) * scale)
        net[1].running_var.copy_((torch.rand(8) + 0.5) * scale ** 2)
        net[1].eps *= scale ** 2
        net[0].weight *= scale
    return net.eval()


def test_scaling_a_normalised_first_layer_moves_fu_by_c_and_relative_fu_by_c_squared():
    """w1 -> c·w1 before a BatchNorm leaves the function unchanged, so the loss gradient wrt
    w1 becomes g1/c and the second layer's stays: FU = ‖g2‖/‖g1‖ grows by c, while the relative
    FU, (‖g2‖/‖w2‖)/(‖g1‖/‖w1‖), grows by c² (‖w1‖ grows by c too). The relative variant is
    free of a layer's parameter count, not of every reparametrisation."""
    torch.manual_seed(1)
    images, labels = torch.randn(36, 3, 12, 12), np.arange(36) % 3
    c = 4.0
    base, scaled = _conv_bn_net(1.0), _conv_bn_net(c)
    with torch.no_grad():
        assert torch.allclose(base(images), scaled(images), atol=1e-5)

    def fu(net: nn.Module, relative: bool) -> float:
        return fu_score(net, "0", "3", lambda idx: images[idx], labels, relative=relative)

    assert fu(scaled, False) == pytest.approx(c * fu(base, False), rel=1e-4)
    assert fu(scaled, True) == pytest.approx(c ** 2 * fu(base, True), rel=1e-4)


def test_fu_variants_are_paper_by_default_and_relative_on_request():
    requests = parse_metrics(["lp", "fu", "fu:relative", "fu:paper"])
    assert [r.column for r in requests] == ["lp", "fu", "fu:relative"]
    assert "fu:relative" not in [r.column for r in parse_metrics(["all"])]
    with pytest.raises(MedcurateError, match="no variant 'rms' .*its variants: paper, relative"):
        parse_metrics(["fu:rms"])


def test_mean_auc_is_the_fine_tuning_protocols_auc():
    """The rank AUC of the bootstrap equals sklearn's, binary and one-vs-rest."""
    from medcurate.train.evaluation import auc
    from medcurate.transfer.evaluate import mean_auc

    rng = np.random.default_rng(0)
    for classes in (2, 4):
        y = rng.integers(0, classes, 300)
        probs = special.softmax(rng.normal(size=(300, classes)) + np.eye(classes)[y], axis=1)
        probs[:10] = probs[0]  # ties
        assert mean_auc(y, probs, 1) == pytest.approx(auc(y, probs, 1), abs=1e-12)


def _models_of_rising_skill(rng, y, skills, seeds):
    """[M, S, N, 2] probabilities: model m separates the classes by ``skills[m]`` plus noise."""
    out = np.empty((len(skills), seeds, len(y), 2))
    for i, skill in enumerate(skills):
        for s in range(seeds):
            logit = skill * (2 * y - 1) + rng.normal(size=len(y))
            out[i, s, :, 1] = special.expit(logit)
            out[i, s, :, 0] = 1 - out[i, s, :, 1]
    return out


def test_bootstrap_tau_point_and_interval():
    """The point tau is weightedtau against the seed-mean AUC on every image; the interval
    comes from draws of images and seeds: wide where the models are close, collapsed at +1
    where they are far apart, reversed for a reversed score, and absent for a constant one."""
    from medcurate.train.evaluation import auc
    from medcurate.transfer.evaluate import bootstrap_tau

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    far = _models_of_rising_skill(rng, y, [0.0, 0.4, 0.8, 1.6], 3)  # AUC ~.5, .71, .87, .99
    close = _models_of_rising_skill(rng, y, [1.0, 1.02, 1.04, 1.06], 3)
    rising = np.arange(4.0)
    scores = {"right": rising, "reversed": -rising, "constant": np.ones(4),
              "partial": np.array([0.0, np.nan, 2.0, 3.0])}
    result = bootstrap_tau(scores, y, far, positive=1, replicates=200, seed=0)
    seed_mean_auc = np.array([np.mean([auc(y, far[m, s], 1) for s in range(3)])
                              for m in range(4)])
    assert result["right"].tau == pytest.approx(
        stats.weightedtau(rising, seed_mean_auc).statistic)
    assert result["right"].tau == pytest.approx(1.0)
    assert result["right"].interval() == pytest.approx((1.0, 1.0))
    assert result["reversed"].tau == pytest.approx(-1.0)
    assert np.isnan(result["constant"].tau) and result["constant"].interval() is None
    assert result["partial"].tau == pytest.approx(1.0) and len(result["partial"].draws) == 200
    near = bootstrap_tau({"right": rising}, y, close, positive=1, replicates=200, seed=0)
    low, high = near["right"].interval()
    assert high - low > 0.5 and low <= near["right"].tau <= high
    # Seeded: the same draws again.
    again = bootstrap_tau({"right": rising}, y, close, positive=1, replicates=200, seed=0)
    assert np.array_equal(again["right"].draws, near["right"].draws)
