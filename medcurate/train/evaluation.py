"""Classifier metrics, validation folds, intervals, a paired permutation test, and the
test images that duplicate training images.

Plain numpy/scikit-learn over predicted class probabilities, so fine-tuning, the shortcut
audit and the selection comparison score models the same way.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from medcurate.config import BINARY_ONLY_METRICS
from medcurate.errors import MedcurateError


def check_metrics(metrics: list[str], n_classes: int) -> None:
    """Refuse binary-only metrics on multi-class data before any training starts."""
    binary = [m for m in metrics if m in BINARY_ONLY_METRICS]
    if binary and n_classes != 2:
        raise MedcurateError(f"metric(s) {', '.join(binary)} need binary data; this data has "
                             f"{n_classes} classes (use auc, balanced-accuracy or accuracy)")


def auc(targets: np.ndarray, probs: np.ndarray, positive: int) -> float | None:
    """Binary: AUC of the positive class's probability; several classes: the mean one-vs-rest
    AUC over the classes present. None where a test set holds a single class."""
    present = np.unique(targets)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(targets == positive, probs[:, positive]))
    return float(np.mean([roc_auc_score(targets == k, probs[:, k]) for k in present]))


def classification_metrics(targets: np.ndarray, probs: np.ndarray, metrics: list[str],
                           positive: int) -> dict[str, float | None]:
    """The requested metrics of predicted probabilities ``probs [N, K]`` against ``targets``."""
    predicted = probs.argmax(axis=1)
    values: dict[str, float | None] = {}
    for name in metrics:
        if name == "auc":
            values[name] = auc(targets, probs, positive)
        elif name == "balanced-accuracy":
            values[name] = float(balanced_accuracy_score(targets, predicted))
        elif name == "accuracy":
            values[name] = float(np.mean(predicted == targets))
        else:  # sensitivity / specificity: recall of the positive / the negative class
            wanted = targets == positive if name == "sensitivity" else targets != positive
            hits = (predicted == positive) if name == "sensitivity" else (predicted != positive)
            values[name] = float(hits[wanted].mean()) if wanted.any() else None
    return values


def fold_plan(targets: np.ndarray, folds: int, val_fraction: float,
              seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs: one stratified hold-out of ``val_fraction`` when
    ``folds`` is 1, else stratified K-fold. Classes too small to split stay in training."""
    targets = np.asarray(targets)
    index = np.arange(len(targets))
    counts = np.bincount(targets)
    if folds > 1:
        if counts[counts > 0].min() < folds:
            raise MedcurateError(f"{folds} folds need at least {folds} images in every class; "
                                 f"the smallest class has {counts[counts > 0].min()}")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [(train, val) for train, val in splitter.split(index, targets)]
    splittable = counts[targets] >= 2
    train, val = train_test_split(index[splittable], test_size=val_fraction, random_state=seed,
                                  stratify=targets[splittable])
    if len(val) == 0:
        raise MedcurateError("too few training images to hold any out for validation")
    return [(np.sort(np.concatenate([train, index[~splittable]])), np.sort(val))]


def mean_interval(values: list[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean and Student-t interval over runs (seeds or folds); no interval from one run."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(data) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(data.mean())
    if len(data) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, len(data) - 1) * stats.sem(data))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(len(data))}


def rank_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC from ranks (ties averaged): thousands of calls in a permutation test."""
    ranks = stats.rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_auc_permutation(targets: list[np.ndarray], scores_a: list[np.ndarray],
                           scores_b: list[np.ndarray], permutations: int,
                           seed: int) -> dict[str, float]:
    """Two-sided paired permutation test of mean AUC(a) − mean AUC(b) over test sets that
    both models scored on the same images (one per fold; ``targets`` are boolean: positive
    or not). Each model's scores are first replaced by their normalised ranks within the
    test set: AUC depends on ranks only, so the observed difference is unchanged, but two
    models whose raw scores live on different scales (a calibrated probability against a
    sharp one) become exchangeable under the null. Each permutation then swaps the two
    models' rank scores per image."""
    rng = np.random.default_rng(seed)
    scores_a = [stats.rankdata(a) / len(a) for a in scores_a]
    scores_b = [stats.rankdata(b) / len(b) for b in scores_b]

    def mean_difference(a_sets, b_sets):
        return np.mean([rank_auc(y, a) - rank_auc(y, b)
                        for y, a, b in zip(targets, a_sets, b_sets)])

    observed = mean_difference(scores_a, scores_b)
    extreme = 0
    for _ in range(permutations):
        swaps = [rng.random(len(y)) < 0.5 for y in targets]
        a_perm = [np.where(s, b, a) for s, a, b in zip(swaps, scores_a, scores_b)]
        b_perm = [np.where(s, a, b) for s, a, b in zip(swaps, scores_a, scores_b)]
        extreme += abs(mean_difference(a_perm, b_perm)) >= abs(observed) - 1e-12
    return {"difference": float(observed), "p_value": (extreme + 1) / (permutations + 1)}


def duplicates_of_training(test_sha: list, train_sha: list, test_x: np.ndarray | None,
                           train_x: np.ndarray | None, cosine: float) -> dict[str, np.ndarray]:
    """Test rows that repeat a training image: ``exact`` (same content sha256) and ``near``
    (not exact, but an embedding with cosine similarity ≥ ``cosine`` to a training image's;
    skipped when no embeddings are given). A test image seen in training measures memory, not
    generalisation, and favours strategies that pick dense, duplicated regions. Boolean masks
    over the test rows."""
    from medcurate import backends

    exact = np.isin(np.asarray(test_sha, dtype=object), np.asarray(train_sha, dtype=object))
    near = np.zeros(len(exact), dtype=bool)
    if test_x is not None and train_x is not None and len(train_x) and cosine < 1.0:
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sq, _ = backends.knn(unit(train_x), 1, queries=unit(test_x))
        near = (1.0 - sq[:, 0] / 2.0 >= cosine) & ~exact
    return {"exact": exact, "near": near}
