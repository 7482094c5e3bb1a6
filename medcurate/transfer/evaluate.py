"""How well transferability scores predict fine-tuned performance, and how far metrics agree.

Per target, the weighted Kendall tau (``scipy.stats.weightedtau``: hyperbolic weights, so
agreement at the top of the ranking counts most) between each metric's scores of the source
models and their fine-tuned AUCs, and a table ranking the metrics on every target. Reads the
published tables of Juodelyte et al.: wide CSVs, one row per source model (a pandas index
column, then ``source``), one column per target, the source == target cell empty. A source
trained on the target is left out where its cells are empty, never by its name: names say
nothing of training data (``medcurate score`` leaves such sources out by provenance).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from medcurate.errors import MedcurateError
from medcurate.transfer.metrics import minmax

PUBLISHED_METRICS = ("logme", "sfda", "leep", "parc", "ncti", "nleep")
PAPER = "our"  # the paper's own score, named as in its ktau_*_rank.csv files


@dataclass(frozen=True)
class WideTable:
    """Scores or AUCs of source models (rows) on targets (columns); NaN where empty."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    values: np.ndarray

    def column(self, target: str, rows: tuple[str, ...] | None = None) -> np.ndarray:
        """One target's values, for ``rows`` (default: this table's rows) in that order."""
        values = self.values[:, self.columns.index(target)]
        if rows is None:
            return values
        index = {name: i for i, name in enumerate(self.rows)}
        return np.array([values[index[r]] if r in index else np.nan for r in rows])


def read_wide_table(path: str | Path) -> WideTable:
    """A published wide table: the ``source`` column names the rows, other columns but an
    unnamed (pandas index) one are targets; empty cells become NaN."""
    with open(path, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    if not lines or "source" not in lines[0]:
        raise MedcurateError(f"{path} has no 'source' column")
    header = lines[0]
    name_at = header.index("source")
    targets = [i for i, name in enumerate(header) if name and i != name_at]
    rows = tuple(line[name_at] for line in lines[1:] if line)
    values = np.array([[float(line[i]) if line[i].strip() else np.nan for i in targets]
                       for line in lines[1:] if line], dtype=np.float64)
    return WideTable(rows, tuple(header[i] for i in targets), values.reshape(len(rows), -1))


def paper_scores(lp: WideTable, fu: WideTable) -> WideTable:
    """minmax(LP) * minmax(FU) per target column, each normalised over every source the table
    has a value for. As in the published notebooks, the target's own row takes part in the
    normalisation where it has a value (FU does, LP does not); its empty LP cell leaves it
    out of tau."""
    values = np.stack([minmax(lp.column(t)) * minmax(fu.column(t, lp.rows))
                       for t in lp.columns], axis=1)
    return WideTable(lp.rows, lp.columns, values)


def weighted_tau(scores: WideTable, aucs: WideTable) -> dict[str, float]:
    """Per target: ``weightedtau(score, auc)`` over the sources with both values (NaN when all
    scores are equal, e.g. SFDA saturating at 1)."""
    taus = {}
    for target in scores.columns:
        score, auc = scores.column(target), aucs.column(target, scores.rows)
        finite = np.isfinite(score) & np.isfinite(auc)
        taus[target] = float(stats.weightedtau(score[finite], auc[finite]).statistic)
    return taus


def rank_metrics(taus: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """Per target, each metric's rank by tau (1 = best, ties share the best rank, NaN last)."""
    metrics = list(taus)
    targets = list(next(iter(taus.values()))) if taus else []
    table = {}
    for target in targets:
        values = np.array([taus[m][target] for m in metrics])
        ranks = stats.rankdata(-np.nan_to_num(values, nan=-np.inf), method="min")
        table[target] = dict(zip(metrics, (int(r) for r in ranks)))
    return table


def evaluate_published(folder: str | Path, kind: str = "dataset",
                       metrics: tuple[str, ...] = PUBLISHED_METRICS) -> dict[str, dict[str, float]]:
    """Weighted tau of each published metric and of the paper's score, per target, from the
    ``{metric}_{kind}.csv``, ``lp``/``fu`` and ``AUCs_{kind}.csv`` tables in ``folder``."""
    def table(name: str) -> WideTable:
        return read_wide_table(Path(folder) / f"{name}_{kind}.csv")

    aucs = table("AUCs")
    taus = {metric: weighted_tau(table(metric), aucs) for metric in metrics}
    taus[PAPER] = weighted_tau(paper_scores(table("lp"), table("fu")), aucs)
    return taus


def read_rank_table(path: str | Path) -> dict[str, dict[str, int]]:
    """A published ``ktau_*_rank.csv`` (``;``-separated: index, target, one column per metric)."""
    with open(path, newline="", encoding="utf-8") as handle:
        lines = [line for line in csv.reader(handle, delimiter=";") if line]
    header = lines[0]
    at = header.index("target")
    metrics = [(i, name) for i, name in enumerate(header) if name and i != at]
    return {line[at]: {name: int(line[i]) for i, name in metrics} for line in lines[1:]}


def metric_agreement(values: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """Kendall tau between every two metrics' scores of the same models (None where fewer than
    two models have both values, or one of them scores every such model the same)."""
    names = list(values)
    matrix: dict[str, dict[str, float | None]] = {}
    for a in names:
        matrix[a] = {}
        for b in names:
            both = np.isfinite(values[a]) & np.isfinite(values[b])
            tau = (stats.kendalltau(values[a][both], values[b][both]).statistic
                   if both.sum() >= 2 else np.nan)
            matrix[a][b] = None if not np.isfinite(tau) else round(float(tau), 6)
    return matrix


@dataclass(frozen=True)
class BootstrapTau:
    """A metric's weighted tau against test AUCs: the point value and the replicate values
    its interval comes from (kept so taus can be averaged or differenced replicate by
    replicate: every metric of a target sees the same draws)."""

    tau: float
    draws: np.ndarray

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        finite = self.draws[np.isfinite(self.draws)]
        if not len(finite):
            return None
        low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
        return float(low), float(high)


def mean_auc(y: np.ndarray, probs: np.ndarray, positive: int) -> float:
    """AUC of probabilities ``[N, K]`` as the fine-tuning protocol reports it (binary: the
    positive class; several: mean one-vs-rest over the classes present), from ranks: fast
    enough for thousands of bootstrap draws."""
    from medcurate.train.evaluation import rank_auc

    if probs.shape[1] == 2:
        return rank_auc(y == positive, probs[:, positive])
    return float(np.mean([rank_auc(y == k, probs[:, k]) for k in np.unique(y)]))


def bootstrap_tau(scores: dict[str, np.ndarray], y: np.ndarray, probs: np.ndarray,
                  positive: int, replicates: int = 1000, seed: int = 0) -> dict[str, BootstrapTau]:
    """Weighted tau of each metric's scores (``[M]`` per model, NaN where it has none) with
    the models' test AUC, and its sampling spread over test images and training seeds.

    ``probs [M, S, N, K]`` are model m's test probabilities after training with seed s, on
    the same N images (targets ``y``). The point tau uses every image and the AUC averaged
    over seeds; each replicate draws the images with replacement (one draw for all models:
    they are compared on the same images) and the seeds with replacement, then averages each
    model's AUC over the drawn seeds."""
    models, n_seeds, n_images = probs.shape[:3]
    rng = np.random.default_rng(seed)

    def aucs(images: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        return np.array([np.mean([mean_auc(y[images], probs[m, s][images], positive)
                                  for s in seeds]) for m in range(models)])

    def taus(auc: np.ndarray) -> dict[str, float]:
        out = {}
        for metric, values in scores.items():
            finite = np.isfinite(values)
            out[metric] = float(stats.weightedtau(values[finite], auc[finite]).statistic) \
                if finite.sum() >= 2 else np.nan
        return out

    point = taus(aucs(np.arange(n_images), np.arange(n_seeds)))
    draws = {metric: np.empty(replicates) for metric in scores}
    for r in range(replicates):
        images = rng.integers(0, n_images, n_images)
        while len(np.unique(y[images])) < 2:  # an AUC needs both sides
            images = rng.integers(0, n_images, n_images)
        for metric, value in taus(aucs(images, rng.integers(0, n_seeds, n_seeds))).items():
            draws[metric][r] = value
    return {metric: BootstrapTau(point[metric], draws[metric]) for metric in scores}
