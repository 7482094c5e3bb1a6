"""The metrics ``medcurate score`` computes, their variants and defaults, in one table.

A metric needs ``features`` (the probe's embeddings), ``source`` (the model's source-task
probabilities, from its own classifier head) or ``images`` (FU: one backward pass per batch,
computed by the scoring task itself). ``--metrics`` items are ``all`` or ``NAME[:VARIANT]``;
a variant left out is the metric's default, and a column is named by its metric alone where
the variant is the default (``ncti``), else ``NAME:VARIANT`` (``ncti:plus``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medcurate.catalogue import parse_metric
from medcurate.transfer import metrics as m
from medcurate.transfer.paper import FU_VARIANTS, lp_score


@dataclass(frozen=True)
class Metric:
    compute: Callable | None  # (matrix, labels, [variant=]) -> float; None: computed by the task
    needs: str  # "features", "source" (source-task probabilities) or "images"
    variants: tuple[str, ...] = ()
    default: str | None = None


METRICS: dict[str, Metric] = {
    "lp": Metric(lp_score, "features"),
    "fu": Metric(None, "images", FU_VARIANTS, "paper"),
    "logme": Metric(m.logme, "features", m.REFERENCE_VARIANTS, "exact"),
    "leep": Metric(m.leep, "source", m.LEEP_VARIANTS, "log"),
    "nce": Metric(m.nce, "source"),
    "nleep": Metric(m.nleep, "features", m.NLEEP_VARIANTS, "log"),
    "hscore": Metric(m.hscore, "features"),
    "hscore-reg": Metric(m.regularized_hscore, "features", m.REFERENCE_VARIANTS, "exact"),
    "sfda": Metric(m.sfda, "features", m.REFERENCE_VARIANTS, "exact"),
    "parc": Metric(m.parc, "features", m.REFERENCE_VARIANTS, "exact"),
    "ncti": Metric(m.ncti_terms, "features", m.NCTI_VARIANTS, "minus"),  # combined zoo-wide
    "gbc": Metric(m.gbc, "features", m.GBC_VARIANTS, "diagonal"),
    "transrate": Metric(m.transrate, "features"),
}


@dataclass(frozen=True)
class Request:
    """One output column: a metric and, where it has variants, which one."""

    name: str
    variant: str | None

    @property
    def column(self) -> str:
        default = METRICS[self.name].default
        return self.name if self.variant == default else f"{self.name}:{self.variant}"


def parse_metrics(items: list[str]) -> list[Request]:
    """``all`` or names, each optionally ``NAME:VARIANT``; unknown ones fail before any work."""
    requests: list[Request] = []
    for item in items or ["all"]:
        if item == "all":
            new = [Request(name, METRICS[name].default) for name in METRICS]
        else:
            new = [Request(*parse_metric(item))]
        requests += [r for r in new if r not in requests]
    return requests
