"""Transferability baselines as plain numpy functions of (features or source predictions, labels).

Every function takes ``features`` ``[N, D]`` (penultimate activations of a pretrained model on
the target's probe images) or ``source_probs`` ``[N, Z]`` (its predicted distribution over the
source task's Z classes), and the target ``labels`` ``[N]`` (any hashable values), and returns
one float: larger means "predicted to fine-tune better". None looks at the order of the rows:
where a step is random or approximate (GMM, k-means, PCA solvers, L-BFGS) the rows are first
put in a canonical order (:func:`order_invariant`), so permuting the samples gives the same value.

Where published implementations disagree, ``variant=`` names the alternatives:

- ``leep`` / ``nleep``: ``"log"`` (default; the mean log expected empirical prediction, as
  LEEP (Nguyen et al., 2020) and NLEEP (Li et al., 2021) define it, and as the LEEP table of
  Juodelyte et al. holds) or ``"prob"`` (the mean probability without the log, as the SFDA
  authors' code computes both and as Juodelyte et al.'s NLEEP table holds).
- ``ncti``: ``"minus"`` (default; the NCTI authors' combination, seli + ncc - vc: less
  within-class collapse of the predictions scores lower) or ``"plus"`` (seli + ncc + vc, as the
  code of Juodelyte et al. adds the third term; their NCTI table spans [0, 3]).
- ``gbc``: ``"diagonal"`` (default, the GBC paper's main variant) or ``"spherical"`` Gaussians.
- ``logme``, ``regularized_hscore``, ``sfda``, ``parc``: ``"exact"`` (default: converged,
  exact eigenvalues and PCA, one normalisation) or ``"reference"``, the rule of the authors'
  published code (thuml/LogME, Transfer-Learning-Library's ``tllib.ranking``, TencentARC/SFDA);
  ``nleep``'s ``"reference"`` is TencentARC/SFDA's. ``leep`` (``"log"``), ``nce``, ``hscore``
  and ``transrate`` already compute what ``tllib.ranking`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from scipy import linalg, stats

from medcurate.errors import MedcurateError

_TINY = 1e-12


# -- shared checks and helpers ---------------------------------------------------------------------
def encode_labels(labels) -> tuple[np.ndarray, int]:
    """Integer codes 0..C-1 (classes in sorted order) and the class count C."""
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1 if codes.size else 0


def check_inputs(matrix, labels, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The matrix as float64, the label codes and class count; bad input is a clear error."""
    matrix = np.asarray(matrix, dtype=np.float64)
    codes, classes = encode_labels(labels)
    if matrix.ndim != 2 or matrix.shape[0] != codes.size:
        raise MedcurateError(f"{what} must be [N, D] with one row per label; got {matrix.shape} "
                             f"for {codes.size} labels")
    if classes < 2:
        raise MedcurateError("transferability needs at least two target classes")
    if not np.isfinite(matrix).all():
        raise MedcurateError(f"{what} hold NaN or infinite values")
    return matrix, codes, classes


def _probabilities(source_probs, labels) -> tuple[np.ndarray, np.ndarray, int]:
    probs, codes, classes = check_inputs(source_probs, labels, "source predictions")
    if (probs < 0).any():
        raise MedcurateError("source predictions must be probabilities (non-negative)")
    return probs / np.maximum(probs.sum(axis=1, keepdims=True), _TINY), codes, classes


def order_invariant(fn: Callable) -> Callable:
    """Run ``fn(matrix, labels, ...)`` on rows sorted by (label, values): a random or iterative
    step then sees the same input whatever order the caller's samples came in."""

    @functools.wraps(fn)
    def wrapper(matrix, labels, *args, **kwargs):
        matrix = np.asarray(matrix)
        codes, _ = encode_labels(labels)
        if matrix.ndim == 2 and matrix.shape[0] == codes.size:
            order = np.lexsort([*matrix.T[::-1], codes])
            matrix, labels = matrix[order], np.asarray(labels)[order]
        return fn(matrix, labels, *args, **kwargs)

    return wrapper


REFERENCE_VARIANTS = ("exact", "reference")


def _check_variant(variant: str, allowed: tuple[str, ...], metric: str) -> None:
    if variant not in allowed:
        raise MedcurateError(f"{metric} has no variant {variant!r} "
                             f"(variants: {', '.join(allowed)})")


def _pca(features: np.ndarray, components: int | float,
         **randomized) -> tuple[np.ndarray, np.ndarray]:
    """PCA: projected rows and the explained variances. Exact (full SVD, signs fixed by sklearn's
    convention) unless ``randomized`` gives the randomised solver's options; exact so that the
    result does not hang on row order."""
    from sklearn.decomposition import PCA

    if isinstance(components, int):
        components = max(1, min(components, *features.shape))
    pca = PCA(n_components=components, svd_solver="randomized" if randomized else "full",
              **randomized)
    # U S of the (randomised) SVD, as published code takes it: for the randomised solver this is
    # not X V^T, which would add the part of X outside its approximate range.
    return pca.fit_transform(features), pca.explained_variance_


def _class_means(features: np.ndarray, codes: np.ndarray, classes: int) -> np.ndarray:
    means = np.zeros((classes, features.shape[1]))
    np.add.at(means, codes, features)
    return means / np.bincount(codes, minlength=classes)[:, None]


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    return scores / scores.sum(axis=1, keepdims=True)


# -- LogME ---------------------------------------------------------------------------------------
def _logme_spectrum(f: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The left singular vectors and squared singular values the evidence sums over, and the
    dimension that multiplies log(alpha).

    ``"exact"``: the nonzero singular values and their count k, so that log|A| also counts the
    D - k zero ones. ``"reference"`` (thuml/LogME): every one of the min(N, D) singular values
    when N <= D; when N > D, the square roots of F^T F's, those above 1e-10 (roundoff keeps
    near-null directions); and always D.
    """
    n, d = f.shape
    if variant == "reference" and n > d:
        _, s2, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s2)
        keep = s > 1e-10
        return f @ vh[keep].T / s[keep], s[keep] ** 2, d
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    if variant == "reference":
        return u, s ** 2, d
    keep = s > s.max(initial=0.0) * 1e-10
    return u[:, keep], s[keep] ** 2, int(keep.sum())


def _log_evidence(y: np.ndarray, u: np.ndarray, sigma: np.ndarray, dims: int,
                  variant: str) -> float:
    """The maximised log evidence / N of a Bayesian linear regression of ``y`` on the features
    (left singular vectors ``u``, squared singular values ``sigma``), by MacKay's fixed-point
    updates of the prior and noise precisions alpha and beta from alpha = beta = 1.

    ``"exact"`` iterates to a relative change of alpha/beta below 1e-6 (at most 100 times) and
    evaluates the evidence at the final alpha, beta. ``"reference"`` follows thuml/LogME: at most
    11 iterations, tolerance 1e-3, 1e-5 added to both update denominators, and the evidence takes
    the final alpha, beta with the weight norm and residual from before their last update.
    """
    max_iter, tol, eps = (11, 1e-3, 1e-5) if variant == "reference" else (100, 1e-6, 0.0)
    n = y.size
    x2 = (u.T @ y) ** 2
    outside = max(float(y @ y - x2.sum()), 0.0)  # the part of y no feature direction spans

    def fit(alpha: float, beta: float) -> tuple[float, float, float]:
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
        res2 = float(((t / (sigma + t)) ** 2 * x2).sum()) + outside
        return gamma, m2, res2

    alpha = beta = 1.0
    for _ in range(max_iter):
        gamma, m2, res2 = fit(alpha, beta)
        new_alpha = gamma / max(m2 + eps, _TINY)
        new_beta = (n - gamma) / max(res2 + eps, _TINY)
        done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) <= tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    if variant == "exact":
        _, m2, res2 = fit(alpha, beta)
    evidence = (dims / 2 * np.log(alpha) + n / 2 * np.log(beta)
                - 0.5 * np.log(alpha + beta * sigma).sum()
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
    return float(evidence / n)


def logme(features, labels, variant: str = "exact") -> float:
    """LogME (You et al., 2021): per class, the maximised log evidence of a Bayesian linear
    regression of the one-hot label on the features, divided by N; averaged over classes.

    ``"exact"`` (default) converges and counts the ``D - k`` zero singular values in ``log|A|``;
    the authors' fixed-point code (``"reference"``) stops early and, when N < D (the usual probe
    regime), adds (D - N)/2 log(alpha) that the evidence does not have.
    """
    _check_variant(variant, REFERENCE_VARIANTS, "logme")
    f, codes, classes = check_inputs(features, labels, "features")
    u, sigma, dims = _logme_spectrum(f, variant)
    return float(np.mean([_log_evidence((codes == c).astype(np.float64), u, sigma, dims, variant)
                          for c in range(classes)]))


# -- LEEP, NLEEP, NCE ----------------------------------------------------------------------------
LEEP_VARIANTS = ("log", "prob")


def leep(source_probs, labels, variant: str = "log") -> float:
    """LEEP (Nguyen et al., 2020): how well the empirical conditional P(y | z) of target label y
    given source label z, pushed through the source model's predictions, predicts the labels.

    Perfect source predictions give 0 (``"log"``) or 1 (``"prob"``); uninformative ones give
    the mean log of the class frequencies (log 1/C for balanced classes).
    """
    _check_variant(variant, LEEP_VARIANTS, "leep")
    probs, codes, classes = _probabilities(source_probs, labels)
    joint = np.zeros((classes, probs.shape[1]))
    np.add.at(joint, codes, probs)
    marginal = joint.sum(axis=0, keepdims=True)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    expected = (probs @ conditional.T)[np.arange(codes.size), codes]
    if variant == "prob":
        return float(expected.mean())
    return float(np.log(np.maximum(expected, _TINY)).mean())


NLEEP_VARIANTS = (*LEEP_VARIANTS, "reference")


@order_invariant
def nleep(features, labels, variant: str = "log", components_per_class: int = 5,
          variance: float = 0.8, seed: int = 0) -> float:
    """NLEEP (Li et al., 2021): LEEP with a pseudo source task, the posteriors of a Gaussian
    mixture (``components_per_class`` x C full-covariance components) fitted to the features
    reduced by PCA to ``variance`` of their variance. Needs no source classifier.

    ``"reference"`` is NLEEP as TencentARC/SFDA's code computes it: ``"prob"`` with sklearn's
    absolute covariance floor (1e-6) rather than one relative to the data's variance."""
    from sklearn.mixture import GaussianMixture

    _check_variant(variant, NLEEP_VARIANTS, "nleep")
    f, codes, classes = check_inputs(features, labels, "features")
    reduced, explained = _pca(f, variance)
    # sklearn's absolute default (1e-6) is scale-blind; keep it relative to the data.
    floor = 1e-6 if variant == "reference" else 1e-6 * max(float(explained.mean()), 1.0)
    mixture = GaussianMixture(
        n_components=min(components_per_class * classes, f.shape[0]), covariance_type="full",
        reg_covar=floor, random_state=seed)
    return leep(mixture.fit(reduced).predict_proba(reduced), codes,
                "prob" if variant == "reference" else variant)


def nce(source_probs, labels) -> float:
    """NCE (Tran et al., 2019): minus the conditional entropy H(Y | Z) of the target label given
    the source model's hard prediction z = argmax of its probabilities. 0 is perfect."""
    probs, codes, classes = _probabilities(source_probs, labels)
    hard = probs.argmax(axis=1)
    joint = np.zeros((classes, probs.shape[1]))
    np.add.at(joint, (codes, hard), 1.0 / codes.size)
    marginal = joint.sum(axis=0, keepdims=True)
    used = joint > 0
    return float((joint[used] * np.log((joint / np.maximum(marginal, _TINY))[used])).sum())


# -- H-score -------------------------------------------------------------------------------------
def _hscore(centred: np.ndarray, codes: np.ndarray, classes: int, cov_f: np.ndarray,
            between_scale: float) -> float:
    between = _class_means(centred, codes, classes)[codes]  # E[f | y] for every sample
    cov_g = between.T @ between / centred.shape[0]
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True) @ cov_g)
                 * between_scale)


def hscore(features, labels) -> float:
    """H-score (Bao et al., 2019): tr(cov(f)^+ cov(E[f | y])), the between-class share of the
    feature covariance. Unstable when N < D (the pseudo-inverse of a rank-deficient covariance);
    see :func:`regularized_hscore`."""
    f, codes, classes = check_inputs(features, labels, "features")
    centred = f - f.mean(axis=0)
    return _hscore(centred, codes, classes, centred.T @ centred / f.shape[0], 1.0)


def regularized_hscore(features, labels, variant: str = "exact") -> float:
    """Shrinkage H-score (Ibrahim et al., 2022): the feature covariance replaced by its
    Ledoit-Wolf shrinkage (1 - a) S + a mu I, and the between-class covariance scaled by 1 - a.

    ``"exact"`` normalises both covariances by N; ``"reference"`` (Transfer-Learning-Library's
    ``tllib.ranking``) takes the between-class one with ``np.cov`` (N - 1) against Ledoit-Wolf's
    N, which scales the score by N / (N - 1)."""
    from sklearn.covariance import ledoit_wolf

    _check_variant(variant, REFERENCE_VARIANTS, "hscore-reg")
    f, codes, classes = check_inputs(features, labels, "features")
    n = f.shape[0]
    cov_f, shrinkage = ledoit_wolf(f)
    between_scale = (1.0 - shrinkage) * (n / (n - 1) if variant == "reference" else 1.0)
    return _hscore(f - f.mean(axis=0), codes, classes, cov_f, between_scale)


# -- SFDA ----------------------------------------------------------------------------------------
def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    out = (1.0 - shrinkage) * cov
    out.flat[:: cov.shape[0] + 1] += shrinkage * np.trace(cov) / cov.shape[0]
    return out


def _largest_eigenvalue(matrix: np.ndarray, power_steps: int | None) -> float:
    """The largest eigenvalue of a symmetric PSD matrix: exact (``power_steps`` None), or as
    TencentARC/SFDA estimates it, ``power_steps`` rounds of two power-iteration products from
    the row sums, then x^T A y of the last two unit vectors (at most the true value)."""
    if power_steps is None:
        return float(linalg.eigh(matrix, eigvals_only=True,
                                 subset_by_index=[matrix.shape[0] - 1] * 2)[0])
    x = matrix.sum(axis=1)
    for _ in range(power_steps):
        y = matrix @ x
        y /= np.linalg.norm(y)
        x = matrix @ y
        x /= np.linalg.norm(x)
    return float(x @ matrix @ y)


def _fisher_posteriors(f: np.ndarray, codes: np.ndarray, classes: int,
                       shrinkage: float | None,
                       power_steps: int | None = None) -> tuple[np.ndarray, float]:
    """Class posteriors of a regularised Fisher discriminant, and its shrinkage (adaptive where
    ``shrinkage`` is None, from S_w's largest eigenvalue found as ``power_steps`` says).

    Projecting onto every Fisher direction W (with W^T S_w W = I, so W W^T = S_w^-1) and
    classifying by the nearest projected class mean is LDA with the shrunk within-class
    scatter S_w, which is what is solved here directly.
    """
    priors = np.bincount(codes, minlength=classes) / codes.size
    means = _class_means(f, codes, classes)
    within = sum(priors[c] * np.cov(f[codes == c], rowvar=False, bias=True).reshape(
        f.shape[1], f.shape[1]) for c in range(classes))
    if shrinkage is None:  # adaptive: the larger the within-class spread, the less shrinkage
        largest = _largest_eigenvalue(within, power_steps)
        shrinkage = max(float(np.exp(-5.0 * largest)), 1e-10)
    coef = linalg.solve(_shrunk(within, shrinkage), means.T, assume_a="sym").T
    intercept = -0.5 * np.einsum("cd,cd->c", means, coef) + np.log(priors)
    return softmax(f @ coef.T + intercept), shrinkage


def sfda(features, labels, variant: str = "exact") -> float:
    """SFDA (Shao et al., 2022): the mean true-class probability of a regularised Fisher
    discriminant refitted after "ConfMix" self-challenging, which pulls each sample towards the
    mean of the other classes' means in proportion to how unsure the first fit was about it.
    The shrinkage exp(-5 * largest eigenvalue of S_w) takes the exact eigenvalue (``"exact"``)
    or, as the authors' code (``"reference"``), three power-iteration steps' underestimate."""
    _check_variant(variant, REFERENCE_VARIANTS, "sfda")
    f, codes, classes = check_inputs(features, labels, "features")
    probs, shrinkage = _fisher_posteriors(f, codes, classes, None,
                                          3 if variant == "reference" else None)
    confidence = softmax(probs)[np.arange(codes.size), codes][:, None]  # softened, as published
    means = _class_means(f, codes, classes)
    others = (means.sum(axis=0) - means) / (classes - 1)
    mixed = confidence * f + (1.0 - confidence) * others[codes]
    probs, _ = _fisher_posteriors(mixed, codes, classes, shrinkage)
    return float(probs[np.arange(codes.size), codes].mean())


# -- PARC ----------------------------------------------------------------------------------------
@order_invariant
def parc(features, labels, variant: str = "exact", dims: int = 32) -> float:
    """PARC (Bolya et al., 2021): Spearman correlation (x100) between the pairwise dissimilarity
    (1 - Pearson) of the samples' standardised PCA features and that of their labels (0 within a
    class, 1 across; exactly, so that the ties Spearman ranks stay ties).

    ``"exact"`` reduces with an exact PCA; ``"reference"`` as TencentARC/SFDA's code, with
    sklearn's randomised PCA (random_state 1919, one power iteration)."""
    _check_variant(variant, REFERENCE_VARIANTS, "parc")
    f, codes, _ = check_inputs(features, labels, "features")
    reduced, _ = (_pca(f, dims, random_state=1919, iterated_power=1) if variant == "reference"
                  else _pca(f, dims))
    std = reduced.std(axis=0)
    reduced = (reduced - reduced.mean(axis=0)) / np.where(std > 0, std, 1.0)
    upper = np.triu_indices(codes.size, 1)
    feature_rdm = 1.0 - np.corrcoef(reduced)[upper]
    label_rdm = (codes[upper[0]] != codes[upper[1]]).astype(np.float64)
    return float(stats.spearmanr(feature_rdm, label_rdm).statistic * 100)


# -- NCTI ----------------------------------------------------------------------------------------
NCTI_VARIANTS = ("minus", "plus")


@order_invariant
def ncti_terms(features, labels, dims: int = 64) -> tuple[float, float, float]:
    """The three per-model terms of NCTI (Wang et al., 2023), on PCA(64) features and a
    shrinkage LDA (shrinkage exp(-sum of the top 32 PCA variances)):

    - seli: nuclear norm of the centred LDA projections (how spread the classes lie),
    - ncc: mean LDA probability of the true class (nearest-class-centre accuracy),
    - vc: log of the summed nuclear norms of each class's prediction matrix (within-class
      variability of the predictions; small when a class's predictions have collapsed).

    NCTI itself compares models: see :func:`ncti`.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    f, codes, classes = check_inputs(features, labels, "features")
    reduced, variances = _pca(f, dims)
    shrinkage = max(float(np.exp(-variances[:32].sum())), 1e-10)
    lda = (LinearDiscriminantAnalysis(solver="svd") if shrinkage == 1e-10 else
           LinearDiscriminantAnalysis(solver="eigen", shrinkage=shrinkage))
    projected = lda.fit(reduced, codes).transform(reduced)
    seli = np.linalg.norm(projected - projected.mean(axis=0), ord="nuc")
    probs = lda.predict_proba(reduced)
    ncc = probs[np.arange(codes.size), codes].mean()
    vc = np.log(sum(np.linalg.norm(probs[codes == c], ord="nuc") for c in range(classes)))
    return float(seli), float(ncc), float(vc)


def minmax(values) -> np.ndarray:
    """(v - min) / (max - min) over the finite values (NaN where undefined or all equal)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if finite.sum() < 2:
        return np.full(values.shape, np.nan)
    low, high = values[finite].min(), values[finite].max()
    if high == low:
        return np.full(values.shape, np.nan)
    return (values - low) / (high - low)


def ncti(terms, variant: str = "minus") -> np.ndarray:
    """NCTI of each model from its :func:`ncti_terms` rows ``[M, 3]``: each term min-max
    normalised across the M models, then seli + ncc - vc (``"minus"``) or + vc (``"plus"``)."""
    _check_variant(variant, NCTI_VARIANTS, "ncti")
    terms = np.asarray(terms, dtype=np.float64).reshape(-1, 3)
    seli, ncc, vc = (minmax(terms[:, i]) for i in range(3))
    return seli + ncc + (vc if variant == "plus" else -vc)


# -- GBC -----------------------------------------------------------------------------------------
GBC_VARIANTS = ("diagonal", "spherical")


@order_invariant
def gbc(features, labels, variant: str = "diagonal", dims: int = 64) -> float:
    """GBC (Pandy et al., 2022): minus the summed Bhattacharyya coefficients between every
    ordered pair of class-conditional Gaussians, on PCA(``dims``) features. 0 means perfectly
    separated classes; the floor, -C(C-1), means identical ones."""
    _check_variant(variant, GBC_VARIANTS, "gbc")
    f, codes, classes = check_inputs(features, labels, "features")
    reduced, _ = _pca(f, dims)
    means = _class_means(reduced, codes, classes)
    variances = np.stack([reduced[codes == c].var(axis=0) for c in range(classes)]) + 1e-8
    if variant == "spherical":
        variances = np.repeat(variances.mean(axis=1, keepdims=True), reduced.shape[1], axis=1)
    total = 0.0
    for i in range(classes):
        for j in range(i + 1, classes):
            pooled = (variances[i] + variances[j]) / 2
            distance = (((means[i] - means[j]) ** 2 / pooled).sum() / 8
                        + 0.5 * (np.log(pooled) - 0.5 * (np.log(variances[i])
                                                         + np.log(variances[j]))).sum())
            total += 2 * np.exp(-distance)  # symmetric: counts (i, j) and (j, i)
    return float(-total)


# -- TransRate -----------------------------------------------------------------------------------
def _coding_rate(z: np.ndarray, eps: float) -> float:
    """1/2 log det(I + Z^T Z / (n eps)), on the smaller of the two Gram matrices."""
    n = z.shape[0]
    gram = z @ z.T if n < z.shape[1] else z.T @ z
    _, logdet = np.linalg.slogdet(np.eye(gram.shape[0]) + gram / (n * eps))
    return 0.5 * float(logdet)


def transrate(features, labels, eps: float = 1e-4) -> float:
    """TransRate (Huang et al., 2022): the coding rate of the centred features minus the mean
    coding rate of each class's features (how much the labels compress the features), with the
    rate and the class average as in the authors' code."""
    f, codes, classes = check_inputs(features, labels, "features")
    z = f - f.mean(axis=0)
    within = np.mean([_coding_rate(z[codes == c], eps) for c in range(classes)])
    return _coding_rate(z, eps) - float(within)
