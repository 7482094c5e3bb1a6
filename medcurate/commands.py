"""Every long-running command by kind: its config schema and the library function that runs it.

The CLI, the HTTP service (``POST /v1/jobs``) and the Ray job entry point (``jobs/run.py``)
all look commands up here, so a kind accepts exactly the same parameters everywhere and adding
a command is one entry. Runners are imported lazily: the CLI and the service start without
importing torch or Ray Train.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pydantic import BaseModel

from medcurate.config import (AuditConfig, CompareConfig, CurateConfig, EmbedConfig,
                              FinetuneConfig, IngestConfig, PretrainConfig, ScoreConfig,
                              SelectConfig)
from medcurate.errors import MedcurateError
from medcurate.workspace import Workspace


@dataclass(frozen=True)
class Command:
    config: type[BaseModel]
    runner: str  # "module:function" taking (config, workspace) and returning a JSON-able dict
    artefact: str | None  # the workspace kind its result is published under, if any

    def run(self, config: BaseModel, workspace: Workspace) -> dict:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(config, workspace)


COMMANDS: dict[str, Command] = {
    "ingest": Command(IngestConfig, "medcurate.ingest:ingest", "collections"),
    "embed": Command(EmbedConfig, "medcurate.embed:embed", "embeddings"),
    "select": Command(SelectConfig, "medcurate.select.run:run_selection", "selections"),
    "curate": Command(CurateConfig, "medcurate.curate:curate", "selections"),
    "score": Command(ScoreConfig, "medcurate.transfer.score:score", "scores"),
    "pretrain": Command(PretrainConfig, "medcurate.train.pretrain:pretrain", "models"),
    "finetune": Command(FinetuneConfig, "medcurate.train.finetune:finetune", "models"),
    "audit": Command(AuditConfig, "medcurate.train.audit:audit", "audits"),
    "compare-selections": Command(CompareConfig, "medcurate.train.compare:compare_selections",
                                  "comparisons"),
}


def command(kind: str) -> Command:
    if kind not in COMMANDS:
        raise MedcurateError(f"unknown command kind {kind!r}; kinds: {', '.join(COMMANDS)}")
    return COMMANDS[kind]


def run_command(kind: str, params: dict, workspace: Workspace) -> dict:
    """Validate ``params`` against the kind's schema and run it (pydantic errors propagate)."""
    entry = command(kind)
    return entry.run(entry.config(**params), workspace)
