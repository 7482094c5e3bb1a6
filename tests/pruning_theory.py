"""The theory behind keeping hard samples, in its smallest model: a teacher–student perceptron
(Sorscher et al., "Beyond neural scaling laws: beating power law scaling via data pruning").

Inputs are Gaussian in ``n_dims`` dimensions, labels the sign of a teacher direction. From a
pool of ``pool_per_dim · n_dims`` examples a share ``keep_share`` is kept, either the hardest
(smallest margin ``|x · probe|``, the probe being the teacher turned by ``probe_angle``
degrees) or a random subset, and a student perceptron is fitted to the kept examples
(logistic regression without intercept, nearly unregularised: on separable data its direction
approaches the max-margin one). Its test error is exactly ``angle(student, teacher) / π``.

What the theory predicts, and OptiDEL relies on: with abundant data (a large pool, so many kept
examples per dimension) keeping the hardest beats random, since the examples near the
boundary pin it down; with scarce data it loses, since hard examples alone say little about
where the boundary lies overall.

Only the tests use it (test_optidel.py), so it lives beside them, not in the package.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.linear_model import LogisticRegression

from medcurate.errors import MedcurateError

RULES = ("hard", "random")


def perceptron_pruning_error(n_dims: int, pool_per_dim: float, keep_share: float, rule: str,
                             *, seed: int = 0, probe_angle: float = 0.0) -> float:
    """Test error of a student perceptron trained on the examples ``rule`` keeps."""
    if rule not in RULES:
        raise MedcurateError(f"unknown pruning rule {rule!r}; use {' or '.join(RULES)}")
    if isinstance(n_dims, bool) or not isinstance(n_dims, numbers.Integral) or n_dims < 2:
        raise MedcurateError(f"n_dims must be an integer of at least 2; got {n_dims!r}")
    if not 0 < keep_share <= 1 or pool_per_dim <= 0:
        raise MedcurateError("keep_share must lie in (0, 1] and pool_per_dim be positive")
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal(n_dims)
    teacher /= np.linalg.norm(teacher)
    turn = rng.standard_normal(n_dims)
    turn -= (turn @ teacher) * teacher
    turn /= np.linalg.norm(turn)
    angle = np.deg2rad(probe_angle)
    probe = np.cos(angle) * teacher + np.sin(angle) * turn
    pool = rng.standard_normal((max(2, round(pool_per_dim * n_dims)), n_dims))
    labels = np.sign(pool @ teacher)
    keep = max(2, round(keep_share * len(pool)))
    kept = (np.argsort(np.abs(pool @ probe), kind="stable")[:keep] if rule == "hard"
            else rng.choice(len(pool), keep, replace=False))
    if len(np.unique(labels[kept])) < 2:
        return 0.5  # one class only: the student knows nothing of the boundary
    student = LogisticRegression(fit_intercept=False, C=1e4, max_iter=5000).fit(
        pool[kept], labels[kept]).coef_[0]
    cosine = student @ teacher / np.linalg.norm(student)
    return float(np.arccos(np.clip(cosine, -1.0, 1.0)) / np.pi)
