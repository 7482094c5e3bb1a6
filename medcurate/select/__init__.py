"""Selection strategies on embeddings: plain numpy functions, no Ray, no workspace.

``select(strategy, X, labels, budget_per_class, ...)`` runs one of ``STRATEGIES`` by name,
optionally within metadata strata (class × stratum cells, each with its share of the class
budget). OptiDEL, which selects a fraction of the whole pool for pretraining and ignores
labels, is no strategy of these: ``medcurate.select.optidel`` (the ``optidel`` command).
"""

from __future__ import annotations

import inspect
import numbers
from typing import Callable

import numpy as np

from medcurate.errors import MedcurateError
from medcurate.select.base import (Gather, SelectionResult, class_rows, derive_seed,
                                   run_info, small_class_note, split_budget, validate_inputs)
from medcurate.select.baselines import (cluster_random, facility_location, herding, kcenter,
                                        random_uniform, stratified, typicality)
from medcurate.select.confounder import confounder_aware, confounder_aware_paper

STRATEGIES: dict[str, Callable[..., SelectionResult]] = {
    "confounder-aware": confounder_aware,
    "confounder-aware-paper": confounder_aware_paper,
    "random": random_uniform,
    "stratified": stratified,
    "kcenter": kcenter,
    "herding": herding,
    "facility-location": facility_location,
    "typicality": typicality,
    "cluster-random": cluster_random,
}

_COMMON = {"X", "labels", "budget_per_class", "seed"}

__all__ = ["STRATEGIES", "SelectionResult", "select", "split_budget", "strategy_params",
           "validate_inputs"]


def strategy_params(strategy: str) -> dict[str, object]:
    """The strategy's own parameters and their defaults (beyond X, labels, budget, seed)."""
    if strategy not in STRATEGIES:
        raise MedcurateError(f"unknown selection strategy {strategy!r}; known: "
                             f"{', '.join(STRATEGIES)}")
    parameters = inspect.signature(STRATEGIES[strategy]).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in _COMMON}


def select(strategy: str, X, labels, budget_per_class: int, *, seed: int = 0, strata=None,
           min_per_stratum: int = 0, **params) -> SelectionResult:
    """Select ``budget_per_class`` rows per class of ``X`` with the named strategy.

    ``strata`` (optional, one key per row, compared as strings; built by the caller from
    metadata columns such as site and sex): each class's budget is split over its strata by
    ``split_budget`` (proportional, with ``min_per_stratum`` per cell where the cell has
    that many images and the budget allows; 0 = purely proportional), and the strategy runs
    within each class × stratum cell on that cell's budget, with a seed derived from
    ``seed`` and the stratum. Unknown strategies or parameters are MedcurateErrors.
    """
    known = strategy_params(strategy)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise MedcurateError(f"strategy {strategy} takes no parameter {', '.join(unknown)}; "
                             f"its parameters: {', '.join(known) or 'none'}")
    fn = STRATEGIES[strategy]
    if strata is None:
        return fn(X, labels, budget_per_class, seed=seed, **params)
    return _select_by_strata(fn, strategy, X, labels, budget_per_class, seed=seed,
                             strata=strata, min_per_stratum=min_per_stratum, params=params)


def _select_by_strata(fn: Callable[..., SelectionResult], strategy: str, X, labels,
                      budget_per_class: int, *, seed: int, strata, min_per_stratum: int,
                      params: dict) -> SelectionResult:
    X, labels = validate_inputs(X, labels, budget_per_class)
    strata = np.asarray([str(key) for key in strata])
    if len(strata) != len(X):
        raise MedcurateError(f"strata must be one key per embedding row: {len(X)} rows but "
                             f"{len(strata)} keys")
    if isinstance(min_per_stratum, bool) or not isinstance(min_per_stratum, numbers.Integral) \
            or min_per_stratum < 0:
        raise MedcurateError(f"min_per_stratum must be a non-negative integer; got "
                             f"{min_per_stratum!r}")
    gather, classes, notes = Gather(len(X)), {}, []
    for label, rows in class_rows(labels):
        keys, inverse = np.unique(strata[rows], return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(keys))
        allocation = split_budget(sizes.tolist(), budget_per_class, minimum=min_per_stratum)
        cells: dict[str, dict] = {}
        for cell, (key, take) in enumerate(zip(keys.tolist(), allocation)):
            cells[key] = {"size": int(sizes[cell]), "budget": take}
            if sizes[cell] >= min_per_stratum > take:
                notes.append(f"class {label}, stratum {key}: budget {budget_per_class} too "
                             f"small for {min_per_stratum} per stratum; got {take}")
            if not take:
                continue
            cell_rows = rows[inverse == cell]
            sub = fn(X[cell_rows], labels[cell_rows], take, seed=derive_seed(seed, key),
                     **params)
            gather.add(cell_rows, sub.indices, sub.group, sub.reason, f"stratum {key}, ",
                       sub.coords, sub.point_groups)
            cells[key].update(sub.info["classes"][str(label)])
        if len(rows) < budget_per_class:
            notes.append(small_class_note(label, len(rows), budget_per_class))
        classes[str(label)] = {"size": len(rows), "budget": budget_per_class,
                               "taken": int(sum(allocation)), "cells": cells}
    if gather.coords is not None:
        notes.append("with strata, each class × stratum cell has its own 2-D map and groups")
    return gather.result(run_info(strategy, seed, budget_per_class, params, classes, notes,
                                  strata={"min_per_stratum": min_per_stratum}))
