"""What every selection strategy shares: the result type, input checks, the budget split and
the per-class loop."""

from __future__ import annotations

import numbers
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from medcurate import backends
from medcurate.errors import MedcurateError

_CHECK_ROWS = 65_536  # rows per chunk of the finiteness check: bounded extra memory


@dataclass
class SelectionResult:
    """The selected rows and why each was chosen.

    ``indices`` (int64) index the input rows, in selection order within each class (classes
    in sorted order). ``group`` is the selected row's group (−1 where a strategy has none),
    ``reason`` a human-readable sentence per selected row, ``info`` the per-class parameters
    and notes (JSON-ready, for provenance). Strategies that build a 2-D map also fill
    ``coords`` (float32 [N, 2]) and ``point_groups`` (int64 [N]) for EVERY input row, so a
    report can draw the map coloured by group; group ids are per class (shared by every
    class where one grouping spans them, as with ``balance_groups``). Strategies that
    synthesise new images (OptiDEL) describe them in ``synthesis``, an object with a
    ``render(load)`` method, since only the caller can read the images.
    """

    indices: np.ndarray
    group: np.ndarray
    reason: list[str]
    info: dict
    coords: np.ndarray | None = None
    point_groups: np.ndarray | None = None
    synthesis: object | None = None


@dataclass
class ClassPick:
    """One class's picks as a strategy returns them: ``indices`` into the class's rows."""

    indices: np.ndarray
    reason: list[str]
    group: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    coords: np.ndarray | None = None
    point_groups: np.ndarray | None = None


def validate_inputs(X, labels, budget_per_class) -> tuple[np.ndarray, np.ndarray]:
    """Check and normalise the inputs of every strategy; returns float32 ``X`` and labels.

    Raises MedcurateError (shown to users) for: ``X`` not a non-empty 2-D numeric array,
    labels not one per row or missing, a budget that is not a positive integer, and rows
    with NaN/inf (naming how many and the first one).
    """
    X = validate_embeddings(X)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(X):
        raise MedcurateError(f"labels must be one per embedding row: {len(X)} rows but labels "
                             f"of shape {labels.shape}")
    if labels.dtype == object and any(label is None for label in labels):
        raise MedcurateError("labels hold missing values (None); label every row first")
    check_budget(budget_per_class)
    return X, labels


def validate_embeddings(X) -> np.ndarray:
    """``X`` as float32 rows, or a MedcurateError: not a non-empty 2-D numeric array, or rows
    with NaN/inf (naming how many and the first one)."""
    X = np.asarray(X)
    if X.ndim != 2 or 0 in X.shape:
        raise MedcurateError(f"embeddings must be a non-empty 2-D array [rows, dims]; got "
                             f"shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise MedcurateError(f"embeddings must be numeric; got dtype {X.dtype}")
    X = backends.as_f32(X)
    bad = np.concatenate([~np.isfinite(X[i:i + _CHECK_ROWS]).all(axis=1)
                          for i in range(0, len(X), _CHECK_ROWS)])
    if bad.any():
        raise MedcurateError(f"{int(bad.sum())} embedding rows hold NaN or inf (first: row "
                             f"{int(np.argmax(bad))}); re-embed or drop them")
    return X


def check_budget(budget) -> int:
    """A budget is a positive integer (bools are not)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
        raise MedcurateError(f"budget per class must be a positive integer; got {budget!r}")
    return int(budget)


def derive_seed(seed: int, *keys) -> int:
    """A 32-bit seed from the user's seed and keys (a class, a stratum): each class draws
    its own stream, unchanged when other classes are added or removed."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise MedcurateError(f"seed must be a non-negative integer; got {seed!r}")
    entropy = [int(seed)] + [zlib.crc32(str(key).encode()) for key in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def class_rows(labels: np.ndarray) -> list[tuple[object, np.ndarray]]:
    """``(label, rows)`` per class in sorted label order; rows ascending."""
    try:
        values, inverse = np.unique(labels, return_inverse=True)
    except TypeError as error:
        raise MedcurateError(f"labels cannot be ordered (mixed types?): {error}") from None
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(values)))[:-1]
    return [(value.item() if isinstance(value, np.generic) else value, rows)
            for value, rows in zip(values, np.split(order, bounds))]


def split_budget(sizes, budget: int, *, minimum: int = 1):
    """Split ``budget`` over groups of the given ``sizes`` (a dict or a sequence; the
    result has the same shape).

    Every group gets at least ``min(minimum, size)`` while the budget allows (when it does
    not, the largest groups win, one unit per group per round); the rest is proportional to
    size, rounded by largest remainder (ties: the larger group, then the earlier one). No
    group gets more than its size, and the total is ``min(budget, sum(sizes))``.
    ``minimum=0`` is the plain proportional split. Used for metadata strata, where a user
    asks for a minimum per cell, and as the paper's allocation over groups (``allocate``).
    """
    keys, counts = _sizes(sizes)
    budget = _check_split_budget(budget)
    target = min(budget, int(counts.sum()))
    floors = np.minimum(counts, int(minimum))
    alloc = _round_robin(counts, floors, target) if floors.sum() >= target else \
        _split(counts, target, floors)
    return _shaped(keys, alloc)


ALLOCATIONS = ("share", "paper")


def allocate(sizes, budget: int, *, rule: str = "share", noise_group: int | None = None):
    """Split a class's ``budget`` over its found groups of ``sizes`` (same shape back).

    ``share`` (the default): proportional to size, and a group is guaranteed one pick only
    where it earns a meaningful share, size ≥ class size / (2 × budget) (its proportional
    quota is at least half a pick), never the noise group; when even those groups outnumber
    the budget the split is purely proportional. So the main mode keeps its share at small
    budgets (``[600, 6, 5, 5, 5, 40]`` over 5 gives ``[5, 0, 0, 0, 0, 0]``) and a group of
    10% gets its own pick from a budget of 5 on.
    ``paper``: Ji et al.'s rule, every group (noise included) one pick while the budget
    allows, largest first (``split_budget``): kept by name so the study can show both.
    """
    if rule not in ALLOCATIONS:
        raise MedcurateError(f"unknown allocation {rule!r}; known: {', '.join(ALLOCATIONS)}")
    if rule == "paper":
        return split_budget(sizes, budget)
    keys, counts = _sizes(sizes)
    budget = _check_split_budget(budget)
    target = min(budget, int(counts.sum()))
    floors = (counts * 2 * max(target, 1) >= counts.sum()).astype(np.int64)
    if noise_group is not None and len(counts) > noise_group:
        floors[noise_group] = 0
    floors = np.minimum(floors, counts)
    if floors.sum() > target:
        floors[:] = 0
    return _shaped(keys, _split(counts, target, floors))


def allocate_by_shares(shares, capacity, budget: int) -> list[int]:
    """Split ``budget`` in proportion to target ``shares`` (non-negative weights), no part
    above its ``capacity`` (what a class holds of each group): a capped part's surplus goes
    to the others in proportion to their shares, and to any part with room once every part
    with a share is full. Largest remainder rounding. Used by ``balance_groups``, where the
    shares are archive-wide and the capacities one class's."""
    shares = np.asarray(shares, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    target = min(int(budget), int(capacity.sum()))
    alloc = np.zeros(len(capacity), dtype=np.int64)
    while alloc.sum() < target:
        room = capacity - alloc
        weights = np.where(room > 0, shares, 0.0)
        if weights.sum() <= 0:
            weights = (room > 0).astype(np.float64)
        left = target - int(alloc.sum())
        quota = np.minimum(weights * left / weights.sum(), room)
        whole = np.floor(quota).astype(np.int64)
        if whole.sum() == 0:  # less than one pick each: the largest remainders take one
            order = sorted(np.flatnonzero(room > 0), key=lambda i: (-quota[i], i))
            for i in order[:left]:
                whole[i] = 1
        alloc += whole
    return alloc.tolist()


def _sizes(sizes) -> tuple[list | None, np.ndarray]:
    keys = list(sizes) if isinstance(sizes, Mapping) else None
    counts = np.asarray(list(sizes.values()) if keys is not None else list(sizes))
    if counts.ndim != 1 or (len(counts) and not np.issubdtype(counts.dtype, np.integer)) \
            or (counts < 0).any():
        raise MedcurateError(f"group sizes must be non-negative integers; got {sizes!r}")
    return keys, counts.astype(np.int64)


def _check_split_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
        raise MedcurateError(f"budget must be a non-negative integer; got {budget!r}")
    return int(budget)


def _shaped(keys: list | None, alloc: np.ndarray):
    alloc = [int(a) for a in alloc]
    return dict(zip(keys, alloc)) if keys is not None else alloc


def _split(sizes: np.ndarray, target: int, floors: np.ndarray) -> np.ndarray:
    """``target`` (≤ the sizes' total) over ``sizes``: each at least its floor (the floors
    fit in the target), the rest proportional to size by largest remainder."""
    if target == sizes.sum():
        return sizes.copy()
    # Groups whose proportional share falls below their floor get the floor; the others
    # share what is left in proportion to size (repeat until no share falls below a floor).
    # Integer arithmetic: quota_i = sizes_i * left / free_total exactly.
    fixed = np.zeros(len(sizes), dtype=bool)
    while True:
        left = target - int(floors[fixed].sum())
        free_total = int(sizes[~fixed].sum())
        below = ~fixed & (sizes * left < floors * free_total)
        if not below.any():
            break
        fixed |= below
    alloc = np.where(fixed, floors, sizes * left // max(free_total, 1))
    remainder = np.where(fixed, -1, sizes * left % max(free_total, 1))
    extra = target - int(alloc.sum())
    order = sorted(range(len(sizes)), key=lambda i: (-remainder[i], -sizes[i], i))
    alloc[order[:extra]] += 1
    return alloc


def _round_robin(sizes: np.ndarray, floors: np.ndarray, target: int) -> np.ndarray:
    """The budget cannot cover every floor: one unit per group per round, largest first."""
    alloc = np.zeros(len(sizes), dtype=np.int64)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    left = target
    for level in range(1, int(floors.max(initial=0)) + 1):
        for i in order:
            if left and floors[i] >= level:
                alloc[i] += 1
                left -= 1
    return alloc


def herd(P: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Herding (mean matching, as in iCaRL): ``k`` rows of ``P``, each the unpicked row that
    brings the mean of the picks closest to ``P``'s mean. The first pick is the row nearest
    the mean (the most typical); later picks spread out only as far as matching the mean
    needs. Returns the picks and, per pick, the distance of the picks' mean from ``P``'s."""
    mean = P.mean(axis=0, dtype=np.float64)
    total = np.zeros_like(mean)
    taken = np.zeros(len(P), dtype=bool)
    picks, gaps = [], []
    distances = backends.DistancesTo(P)
    for t in range(1, k + 1):
        # argmin_x |mean - (total + x) / t|  ==  the row nearest t·mean − total
        sq = distances(t * mean - total)
        sq[taken] = np.inf
        new = int(np.argmin(sq))
        taken[new] = True
        total += P[new]
        picks.append(new)
        gaps.append(float(np.linalg.norm(mean - total / t)))
    return np.asarray(picks, dtype=np.int64), gaps


class Gather:
    """Collects the picks of classes (or class × stratum cells) into one SelectionResult."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.indices: list[np.ndarray] = []
        self.groups: list[np.ndarray] = []
        self.reasons: list[str] = []
        self.coords: np.ndarray | None = None
        self.point_groups: np.ndarray | None = None

    def add(self, rows: np.ndarray, indices, group, reasons: list[str], prefix: str,
            coords: np.ndarray | None = None, point_groups: np.ndarray | None = None) -> None:
        """Picks ``indices`` into ``rows``; ``coords``/``point_groups`` cover all ``rows``."""
        indices = np.asarray(indices, dtype=np.int64)
        self.indices.append(rows[indices])
        self.groups.append(np.full(len(indices), -1) if group is None else group)
        self.reasons += [f"{prefix}{reason}" for reason in reasons]
        if coords is not None:
            if self.coords is None:
                self.coords = np.zeros((self.n_rows, 2), dtype=np.float32)
                self.point_groups = np.full(self.n_rows, -1, dtype=np.int64)
            self.coords[rows], self.point_groups[rows] = coords, point_groups

    def result(self, info: dict) -> SelectionResult:
        return SelectionResult(indices=np.concatenate(self.indices).astype(np.int64),
                               group=np.concatenate(self.groups).astype(np.int64),
                               reason=self.reasons, info=info, coords=self.coords,
                               point_groups=self.point_groups)


Pick = Callable[[np.ndarray, int, int], ClassPick]


def per_class(X, labels, budget_per_class: int, pick: Pick, *, strategy: str, seed: int,
              params: dict) -> SelectionResult:
    """Run ``pick(X_class, k, class_seed)`` on every class with ``k = min(budget, class
    size)`` and gather the picks into one SelectionResult.

    A class smaller than the budget is taken whole (the strategy still orders and explains
    it) and noted in ``info["notes"]``. ``class_seed`` is derived from ``seed`` and the
    class label (see ``derive_seed``).
    """
    X, labels = validate_inputs(X, labels, budget_per_class)
    gather, classes, notes = Gather(len(X)), {}, []
    for label, rows in class_rows(labels):
        k = min(budget_per_class, len(rows))
        class_seed = derive_seed(seed, label)
        picked = pick(X[rows], k, class_seed)
        gather.add(rows, picked.indices, picked.group, picked.reason, f"class {label}, ",
                   picked.coords, picked.point_groups)
        classes[str(label)] = {"size": len(rows), "budget": budget_per_class, "taken": k,
                               "seed": class_seed, **picked.info}
        if len(rows) < budget_per_class:
            notes.append(small_class_note(label, len(rows), budget_per_class))
    return gather.result(run_info(strategy, seed, budget_per_class, params, classes, notes))


def small_class_note(label, size: int, budget: int) -> str:
    return f"class {label} has {size} images < budget {budget}: took all"


def run_info(strategy: str, seed: int, budget_per_class: int, params: dict, classes: dict,
             notes: list[str], **extra) -> dict:
    """The ``info`` every SelectionResult carries, JSON-ready for provenance."""
    return {"strategy": strategy, "seed": seed, "budget_per_class": budget_per_class,
            "params": params, "backend": backends.backend_name(), **extra,
            "classes": classes, "notes": notes}
