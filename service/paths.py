"""Which files a request may name: only those inside the data roots or the workspace.

The paths of a request are found from its config's schema, not from a hand list: every field
typed ``Location`` (``medcurate.config``), every patch-extractor spec (``sam:<checkpoint>``,
and any other ``KIND:PATH``), every ``mae:<checkpoint>`` encoder spec, and the paths a zoo
file names. Each goes through one function, ``medcurate.confine.Roots.resolve``: a local path
is checked after ``os.path.realpath`` (``..`` and symlinks pointing out of a root are refused
like any path outside; ``file://relative/x`` is a relative path), a URI is parsed and refused
with a query string, fragment, credentials or percent-encoded separators and dots, then its
normalised bucket and key compared with the roots that are URIs. The config the job gets
carries the resolved path it was checked with (``mae:<resolved>``, ``sam:<resolved>`` too).

Files an archive lists or links to (a CSV or Parquet table of image paths, symlinks inside a
source folder) are checked where they are read, in the ingest job: ``confine`` sets the ingest
config's ``confine_to`` to these roots, whatever the request said.

A refusal says what was refused and why, never which roots there are or whether the path
exists. Limits: a path can change between this check and its use; a zoo file is read again
by its job (its paths are checked here, and it resolves them the same way).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Iterator

from pydantic import AfterValidator, BaseModel

from medcurate.confine import (
    OUTSIDE,
    PathRefused,
    Roots,
    is_relative,
)
from medcurate.catalogue import MAE_PREFIX, mae_checkpoint
from medcurate.config import absolute_location, extractor_location
from medcurate.errors import MedcurateError

__all__ = ["MAE_PREFIX", "PathPolicy", "PathRefused", "location_fields", "refuse_relative"]

CONFINE_FIELD = "confine_to"  # IngestConfig's: roots every file an archive lists must be in


def _marked(func):
    def is_marker(marker) -> bool:
        return isinstance(marker, AfterValidator) and marker.func is func

    def mentions(annotation) -> bool:
        if typing.get_origin(annotation) is typing.Annotated:
            base, *markers = typing.get_args(annotation)
            return any(map(is_marker, markers)) or mentions(base)
        return any(map(mentions, typing.get_args(annotation)))

    @functools.cache
    def fields(config_cls: type[BaseModel]) -> list[str]:
        return [name for name, field in config_cls.model_fields.items()
                if any(map(is_marker, field.metadata)) or mentions(field.annotation)]
    return fields


_location_fields = _marked(absolute_location)
_extractor_fields = _marked(extractor_location)


def location_fields(config_cls: type[BaseModel]) -> list[str]:
    """Fields of a config typed ``Location`` (also inside ``Location | None``)."""
    return list(_location_fields(config_cls))


def extractor_fields(config_cls: type[BaseModel]) -> list[str]:
    """Fields of a config typed ``ExtractorSpec``: ``grid``, or ``KIND:PATH`` (``sam:...``)."""
    return list(_extractor_fields(config_cls))


def _spec_path(config_cls: type[BaseModel], name: str, value) -> tuple[str, str] | None:
    """``(prefix, path)`` of a field's value that names a file inside a spec, else None (also
    for a spec without its path, e.g. ``sam:``, which names no file: its reader says so)."""
    if not isinstance(value, str):
        return None
    if name in _extractor_fields(config_cls):
        kind, colon, path = value.partition(":")
        return (f"{kind}:", path) if colon and path else None
    if value.startswith(MAE_PREFIX) and len(value) > len(MAE_PREFIX):
        return MAE_PREFIX, value[len(MAE_PREFIX):]
    return None


def _paths_of(config_cls: type[BaseModel], params) -> Iterator[tuple[str, str]]:
    """``(field, path)`` for every path-like value of raw or validated parameters."""
    items = params.items() if isinstance(params, dict) else iter(params)
    locations = set(_location_fields(config_cls))
    for name, value in items:
        if name in locations and isinstance(value, str):
            yield name, value
        elif (spec := _spec_path(config_cls, name, value)) is not None:
            yield name, spec[1]


def refuse_relative(config_cls: type[BaseModel], params) -> None:
    """Before validation: a relative local path (``file://relative/x`` too, and the path of a
    ``mae:`` or ``sam:`` spec) would resolve against the replica's working directory, which no
    client knows, so it is refused (as a ``MedcurateError``, a 422) with the fix."""
    if not isinstance(params, dict):
        return
    for name, value in _paths_of(config_cls, params):
        if value == "" or is_relative(value):  # "" is the working directory itself
            raise MedcurateError(f"{name}: {value!r} is a relative path; name an absolute path "
                                 "inside a data root, or a URI")


def _refused(field: str, exc: PathRefused) -> PathRefused:
    reason = str(exc)
    if reason == OUTSIDE:
        return PathRefused(f"{field}: refused: the path is outside the data roots this service "
                           "may read")
    return PathRefused(f"{field}: refused: {reason}; name a path inside the data roots this "
                       "service may read")


class PathPolicy:
    """Confines the paths of a validated config to ``roots`` (local folders or URI prefixes)."""

    def __init__(self, roots: list[str]):
        self.roots = list(dict.fromkeys(roots))
        self._roots = Roots(self.roots)

    def confine(self, config: BaseModel) -> BaseModel:
        """The config with every path-like field resolved; refuses any path outside. An ingest
        config also gets ``confine_to``: the roots the files its archive lists must lie in."""
        config_cls = type(config)
        resolved = {}
        for name in location_fields(config_cls):
            value = getattr(config, name)
            if value is not None:
                resolved[name] = self.resolve(name, value)
        for name, value in config:
            spec = _spec_path(config_cls, name, value)
            if spec is not None and name not in resolved:
                prefix, path = spec
                resolved[name] = prefix + self.resolve(name, path)
        if resolved.get("zoo"):
            for name, path in _zoo_paths(resolved["zoo"]):
                self.resolve(name, path)
        if CONFINE_FIELD in config_cls.model_fields:
            resolved[CONFINE_FIELD] = list(self.roots)
        return config.model_copy(update=resolved)

    def resolve(self, field: str, value: str) -> str:
        """``value`` resolved (symlinks followed; a URI normalised) if it lies inside a root;
        else ``PathRefused``, naming the field and the reason, not the roots or the target."""
        try:
            return self._roots.resolve(value)
        except PathRefused as exc:
            raise _refused(field, exc) from None


def _zoo_paths(zoo: str) -> Iterator[tuple[str, str]]:
    """Weights files and MAE checkpoints a zoo file names; a bad zoo fails here, before a job."""
    from medcurate.transfer.zoo import load_zoo  # reads YAML only; no torch

    for entry in load_zoo(zoo):
        if entry.weights:
            yield f"zoo[{entry.name}].weights", entry.weights
        checkpoint = mae_checkpoint(entry.model)
        if checkpoint is not None:
            yield f"zoo[{entry.name}].model", checkpoint
