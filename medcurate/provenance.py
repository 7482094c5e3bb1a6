"""Provenance sidecars: what made an artefact, from what, with which code and parameters."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

import medcurate


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version plus the git commit of the source tree, where it is a checkout."""
    source = Path(medcurate.__file__).resolve().parent.parent
    version: dict[str, Any] = {"package": "medcurate", "version": medcurate.__version__}
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        version.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class InputRef(BaseModel):
    role: str = Field(description="what the input is to this artefact: source, metadata, model, ...")
    uri: str
    sha256: str | None = Field(None, description="content hash of the input (for an archive: "
                               "sha256 over its files' hashes in manifest order)")


class OutputRef(BaseModel):
    sha256: str
    bytes: int
    rows: int | None = None


class Provenance(BaseModel):
    """The sidecar every artefact carries, so any result can be reloaded and explained."""

    kind: str
    key: str
    started_at: str
    finished_at: str = Field(default_factory=utc_now)
    code: dict[str, Any] = Field(default_factory=code_version)
    config: dict[str, Any]
    inputs: list[InputRef] = Field(default_factory=list)
    outputs: dict[str, OutputRef] = Field(default_factory=dict)
    model: dict[str, Any] | None = None
    seed: int | None = None
    summary: dict[str, Any] = Field(default_factory=dict)


def json_ready(value):
    """Plain JSON types all the way down (numpy scalars and arrays become Python ones)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def input_of(record: dict, role: str) -> dict:
    """The input of ``role`` that an artefact's provenance ``record`` names (``uri``, ``sha256``:
    what it read, at which version); empty where it names none."""
    return next((ref for ref in record.get("inputs", []) if ref.get("role") == role), {})


def outputs_digest(record: dict) -> str:
    """One hash over an artefact's output hashes (its provenance ``outputs``): changes whenever
    any file changes, so what was made from it can name exactly the version it read."""
    outputs = record.get("outputs", {})
    text = "\n".join(f"{name}:{outputs[name]['sha256']}" for name in sorted(outputs))
    return hashlib.sha256(text.encode()).hexdigest()
