"""The catalogue of names agrees with every library registry, so adding a name is one entry
there plus its implementation; configs reject unknown names when they are built."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from medcurate import catalogue
from medcurate.config import AuditConfig, MaeArch, ScoreConfig, SelectConfig


def test_strategies_agree_with_the_selection_registry():
    from medcurate.select import STRATEGIES

    assert tuple(STRATEGIES) == catalogue.STRATEGIES
    assert typing.get_args(SelectConfig.model_fields["strategy"].annotation) == \
        catalogue.STRATEGIES


def test_each_strategys_parameter_model_matches_its_function():
    """Names and defaults of ``STRATEGY_PARAMS`` are the strategy functions' own keywords, so
    a parameter the model refuses is one the strategy does not take, and vice versa."""
    import inspect

    from medcurate.config import STRATEGY_PARAMS
    from medcurate.select import STRATEGIES

    assert tuple(STRATEGY_PARAMS) == catalogue.STRATEGIES
    runtime = {"transform_map", "map_store"}  # handed in by the runner, not by users
    for name, model in STRATEGY_PARAMS.items():
        signature = inspect.signature(STRATEGIES[name]).parameters
        keywords = {p: signature[p].default for p in signature
                    if p not in {"X", "labels", "budget_per_class", "seed", "cluster_params",
                                 "distance_space", *runtime}}
        defaults = {field: info.default for field, info in model.model_fields.items()}
        assert defaults == keywords, name
        assert model.draws_maps == (runtime <= set(signature)), name


def test_metrics_and_variants_agree_with_the_metric_registry():
    from medcurate.transfer.registry import METRICS

    assert list(METRICS) == list(catalogue.METRIC_VARIANTS)
    for name, metric in METRICS.items():
        assert metric.variants == catalogue.METRIC_VARIANTS[name], name
        assert metric.default == catalogue.metric_default(name), name


def test_confounders_and_mae_archs_agree_with_their_modules():
    from medcurate.confounders import IMAGE_CONFOUNDERS
    from medcurate.models.mae import ARCHS

    assert IMAGE_CONFOUNDERS == catalogue.IMAGE_CONFOUNDERS
    assert tuple(ARCHS) == catalogue.MAE_ARCHS == typing.get_args(MaeArch)


def test_encoder_prefixes_are_the_registrys():
    from medcurate.errors import MedcurateError
    from medcurate.models import create_encoder

    for prefix, kind in catalogue.ENCODER_PREFIXES.items():
        assert catalogue.split_encoder_spec(prefix + "x") == (kind, "x")
        with pytest.raises(MedcurateError, match="unknown encoder spec") as error:
            create_encoder(prefix)  # a prefix with nothing after it names no encoder
        assert all(p in str(error.value) for p in catalogue.ENCODER_PREFIXES)
    assert catalogue.split_encoder_spec("mobilenetv2-imagenet") == (None, "mobilenetv2-imagenet")
    assert catalogue.mae_checkpoint("mae:/a/b.pth") == "/a/b.pth"
    assert catalogue.mae_checkpoint("timm/vit") is None


@pytest.mark.parametrize("metrics, fragment", [
    (["nope"], "unknown metric 'nope' (known: all, lp, fu,"),
    (["lp", "ncti:times"], "metric 'ncti' has no variant 'times' (its variants: minus, plus)"),
    (["hscore:fast"], "it has no variants"),
])
def test_an_unknown_metric_is_a_config_error(metrics, fragment):
    """Raised where the config is built: the CLI's one-line error and the service's 422 (its
    ScoreRequest body is a ScoreConfig), not a job that fails later."""
    from service.api import ScoreRequest

    for model in (ScoreConfig, ScoreRequest):
        with pytest.raises(ValidationError, match="metrics") as error:
            model(target="syn", zoo="/zoo.yaml", metrics=metrics)
        assert fragment in str(error.value)
    config = ScoreConfig(target="syn", zoo="/zoo.yaml", metrics=["all", "leep:prob", "fu"])
    assert config.metrics == ["all", "leep:prob", "fu"]


def test_an_unknown_confounder_names_the_catalogues():
    with pytest.raises(ValidationError, match="choose tag, lowpass, poisson or metadata:COLUMN"):
        AuditConfig(collection="c", confounder="blur", zoo="/zoo.yaml")
