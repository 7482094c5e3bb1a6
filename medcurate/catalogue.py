"""Every user-facing name in one place, torch-free, so configs, the CLI and the HTTP API
validate against the same lists the library implements.

Adding a name is one entry here plus its implementation; tests check that each library
registry (``select.STRATEGIES``, the transferability metric registry, the confounders,
``models.mae.ARCHS``, the encoder registry's spec prefixes) agrees with this catalogue.
"""

from __future__ import annotations

from medcurate.errors import MedcurateError

# -- selection ----------------------------------------------------------------------------------
# Strategies that select a budget of images per class (``medcurate select --strategy``).
STRATEGIES = ("confounder-aware", "confounder-aware-paper", "random", "stratified", "kcenter",
              "herding", "facility-location", "typicality", "cluster-random")
# Strategies that select a share of the whole pool for pretraining, ignoring labels: each is
# its own command (``medcurate optidel``), not a ``select`` strategy.
POOL_STRATEGIES = ("optidel",)

# -- near-duplicates ------------------------------------------------------------------------------
# Which image of a group of near-duplicates ``medcurate dedup --keep`` keeps (medcurate.dedup).
DEDUP_KEEP_RULES = ("central", "earliest", "largest")

# -- transferability metrics ----------------------------------------------------------------------
# Each metric's variants, its default first; an empty tuple: the metric has no variants.
METRIC_VARIANTS: dict[str, tuple[str, ...]] = {
    "lp": (),
    "fu": ("paper", "relative"),
    "logme": ("exact", "reference"),
    "leep": ("log", "prob"),
    "nce": (),
    "nleep": ("log", "prob", "reference"),
    "hscore": (),
    "hscore-reg": ("exact", "reference"),
    "sfda": ("exact", "reference"),
    "parc": ("exact", "reference"),
    "ncti": ("minus", "plus"),
    "gbc": ("diagonal", "spherical"),
    "transrate": (),
}
ALL_METRICS = "all"  # every metric, each in its default variant


def metric_default(name: str) -> str | None:
    """The variant a bare ``NAME`` means (None for a metric without variants)."""
    variants = METRIC_VARIANTS[name]
    return variants[0] if variants else None


def parse_metric(item: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VARIANT`` as (name, variant), the default variant filled in; an
    unknown name or variant is a MedcurateError listing the known ones."""
    name, _, variant = item.partition(":")
    if name not in METRIC_VARIANTS:
        raise MedcurateError(f"unknown metric {item!r} (known: {ALL_METRICS}, "
                             f"{', '.join(METRIC_VARIANTS)})")
    variants = METRIC_VARIANTS[name]
    if variant and variant not in variants:
        offer = f"its variants: {', '.join(variants)}" if variants else "it has no variants"
        raise MedcurateError(f"metric {name!r} has no variant {variant!r} ({offer})")
    return name, variant or metric_default(name)


def metrics_help() -> str:
    """The metric names and their non-default variants, for a field's help text."""
    variants = [f"{name}:{v}" for name, vs in METRIC_VARIANTS.items() for v in vs[1:]]
    return (f"'{ALL_METRICS}', or a comma list of {', '.join(METRIC_VARIANTS)}; NAME:VARIANT "
            f"picks a published variant ({', '.join(variants)})")


# -- confounders of the shortcut audit ------------------------------------------------------------
IMAGE_CONFOUNDERS = ("tag", "lowpass", "poisson")
METADATA_CONFOUNDER = "metadata"  # written metadata:COLUMN, with a carrier value

# -- MAE pretraining ------------------------------------------------------------------------------
MAE_ARCHS = ("mae-vit-tiny", "mae-vit-small")  # the keys of medcurate.models.mae.ARCHS

# -- encoder specs --------------------------------------------------------------------------------
# Prefix -> kind of an encoder spec beyond the registry's named encoders.
ENCODER_PREFIXES = {"timm/": "timm", "random/": "random", "mae:": "mae", "model:": "model"}
MAE_PREFIX, MODEL_PREFIX = "mae:", "model:"


def split_encoder_spec(spec: str) -> tuple[str | None, str]:
    """(kind, rest) of a prefixed spec, e.g. ``mae:/ckpt.pth`` -> ("mae", "/ckpt.pth");
    (None, spec) for a spec without a known prefix (a registry name, or unknown)."""
    for prefix, kind in ENCODER_PREFIXES.items():
        if spec.startswith(prefix):
            return kind, spec[len(prefix):]
    return None, spec


def mae_checkpoint(spec: str) -> str | None:
    """The checkpoint path of a ``mae:<path>`` spec; None for any other spec."""
    kind, rest = split_encoder_spec(spec)
    return rest if kind == "mae" else None
