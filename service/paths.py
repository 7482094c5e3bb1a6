"""Which files a request may name: only those inside the data roots or the workspace.

The paths of a request are found from its config's schema, not from a hand list: every field
typed ``Location`` (``medcurate.config``), every ``mae:<checkpoint>`` encoder spec, and the
paths a zoo file names. A local path is checked after ``os.path.realpath``, so ``..`` and
symlinks pointing out of a root are refused like any path outside; a URI only under a root
that is itself a URI (e.g. an ``s3://`` workspace). The job gets the resolved path it was
checked with. Limits: files that an archive lists (a CSV or Parquet table of image paths) are
read as the archive says, and a path can change between this check and its use.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterator

from pydantic import AfterValidator, BaseModel

from medcurate.config import absolute_location
from medcurate.errors import MedcurateError

MAE_PREFIX = "mae:"


class PathRefused(MedcurateError):
    """A request named a file outside what the service may read (answered 403)."""


def _is_location(marker) -> bool:
    return isinstance(marker, AfterValidator) and marker.func is absolute_location


def _mentions_location(annotation) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        base, *markers = typing.get_args(annotation)
        return any(map(_is_location, markers)) or _mentions_location(base)
    return any(map(_mentions_location, typing.get_args(annotation)))


def location_fields(config_cls: type[BaseModel]) -> list[str]:
    """Fields of a config typed ``Location`` (also inside ``Location | None``)."""
    return [name for name, field in config_cls.model_fields.items()
            if any(map(_is_location, field.metadata)) or _mentions_location(field.annotation)]


def refuse_relative(config_cls: type[BaseModel], params) -> None:
    """Before validation: a relative local path would resolve against the replica's working
    directory, which no client knows, so it is refused (as a ``ValueError``) with the fix."""
    for name in location_fields(config_cls):
        value = params.get(name) if isinstance(params, dict) else None
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            raise MedcurateError(f"{name}: {value!r} is a relative path; name an absolute path "
                                 "inside a data root, or a URI")


class PathPolicy:
    """Confines the paths of a validated config to ``roots`` (local folders or URI prefixes)."""

    def __init__(self, roots: list[str]):
        self.roots = list(dict.fromkeys(roots))

    def confine(self, config: BaseModel) -> BaseModel:
        """The config with its ``Location`` fields resolved; refuses any path outside."""
        resolved = {}
        for name in location_fields(type(config)):
            value = getattr(config, name)
            if value is not None:
                resolved[name] = self.resolve(name, value)
        for name, value in config:
            if isinstance(value, str) and value.startswith(MAE_PREFIX):
                self.resolve(name, value[len(MAE_PREFIX):])
        if resolved.get("zoo"):
            for name, path in _zoo_paths(resolved["zoo"]):
                self.resolve(name, path)
        return config.model_copy(update=resolved)

    def resolve(self, field: str, value: str) -> str:
        """``value`` with symlinks resolved, if it lies inside a root; else ``PathRefused``."""
        if "://" in value and not value.startswith("file://"):
            uri = value.rstrip("/")
            if "/../" not in f"{uri}/" and any(uri == root or uri.startswith(f"{root}/")
                                               for root in self.roots if "://" in root):
                return uri
        else:
            path = os.path.realpath(value.removeprefix("file://"))
            if any(os.path.commonpath([path, root]) == root
                   for root in self.roots if "://" not in root):
                return path
        raise PathRefused(f"{field}: {value!r} is outside the data roots this service may read "
                          f"({self._listing()})")

    def _listing(self) -> str:
        return ", ".join(self.roots) or "none configured"


def _zoo_paths(zoo: str) -> Iterator[tuple[str, str]]:
    """Weights files and MAE checkpoints a zoo file names; a bad zoo fails here, before a job."""
    from medcurate.transfer.zoo import load_zoo  # reads YAML only; no torch

    for entry in load_zoo(zoo):
        if entry.weights:
            yield f"zoo[{entry.name}].weights", entry.weights
        if entry.model.startswith(MAE_PREFIX):
            yield f"zoo[{entry.name}].model", entry.model[len(MAE_PREFIX):]
