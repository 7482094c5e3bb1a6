"""Every long-running command by kind: its config schema, the library function that runs it,
its help text and the line the CLI prints after it.

The CLI, the HTTP service (``POST /v1/jobs``) and the Ray job entry point (``jobs/run.py``)
all look commands up here, so a kind accepts exactly the same parameters everywhere and adding
a command is one entry (the CLI registers every entry in one loop). Runners, and what the
printers need of their modules, are imported lazily: the CLI and the service start without
importing torch or Ray Train.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from medcurate.config import (AuditConfig, CompareConfig, CurateConfig, DedupConfig,
                              EmbedConfig, FinetuneConfig, IngestConfig, OptidelConfig,
                              PretrainConfig, ScoreConfig, SelectConfig)
from medcurate.errors import MedcurateError
from medcurate.workspace import Workspace


Printer = Callable[[BaseModel, Workspace, dict], str | None]


@dataclass(frozen=True)
class Command:
    """One command's whole shape: what it accepts, what runs it, where its result goes, and
    what the CLI says about it. Front ends read only this."""

    config: type[BaseModel]
    runner: str  # "module:function" taking (config, workspace) and returning a JSON-able dict
    artefact: str | None  # the workspace kind its result is published under, if any
    help: str  # the CLI's help text for the command
    printer: Printer | None = None  # the CLI's one stderr line after a run, from the result
    cli_omits: tuple[str, ...] = ()  # result fields the CLI leaves out of its stdout JSON

    def run(self, config: BaseModel, workspace: Workspace) -> dict:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(config, workspace)


def _ingested(config: IngestConfig, workspace: Workspace, summary: dict) -> str:
    return (f"ingested {summary['ingested']} images into collection {config.name!r} "
            f"({summary['rejected']} rejected, {summary['exact_duplicates']} exact duplicates)")


def _selected(config: BaseModel, workspace: Workspace, summary: dict) -> str:
    """select's and optidel's line: how many were kept, and where the report is."""
    from medcurate.select.run import REPORT_FILE

    report = workspace.location(workspace.path("selections", summary["selection_id"],
                                                REPORT_FILE))
    return f"selected {summary['selected']} of {summary['images']} images; report: {report}"


def _deduplicated(config: DedupConfig, workspace: Workspace, summary: dict) -> str:
    return (f"{summary['removed']} near-duplicates in {summary['groups']} groups; "
            f"{summary['leaks']} test images duplicate training images")


def _score_table(config: ScoreConfig, workspace: Workspace, document: dict) -> str:
    from medcurate.transfer.score import format_table  # torch: only once a score has run

    return format_table(document)


COMMANDS: dict[str, Command] = {
    "ingest": Command(
        IngestConfig, "medcurate.ingest:ingest", "collections",
        help="Ingest an archive into a collection: manifest.parquet (ids, labels, splits, "
             "image properties, metadata) and rejects.parquet (every unusable file and why).",
        printer=_ingested),
    "embed": Command(
        EmbedConfig, "medcurate.embed:embed", "embeddings",
        help="Embed a collection with an encoder on Ray Data into Parquet shards; re-running "
             "the same command resumes a run that was cut short."),
    "select": Command(
        SelectConfig, "medcurate.select.run:run_selection", "selections",
        help="Select a budget of images per class from an embedding run: selection.parquet "
             "(id, label, group, reason), summary.json and report.html.",
        printer=_selected, cli_omits=("metadata",)),
    "optidel": Command(
        OptidelConfig, "medcurate.select.pool:run_optidel", "selections",
        help="Select a share of the whole pool for pretraining with OptiDEL (hard images by "
             "prototype margin, k-center spread, plus synthetic images as the collection "
             "<selection>-synth); labels ignored. For `medcurate pretrain --selection`.",
        printer=_selected, cli_omits=("metadata",)),
    "dedup": Command(
        DedupConfig, "medcurate.dedup:dedup", "dedups",
        help="Find near-duplicate images of an embedding run (cosine of embeddings at least "
             "--threshold): groups.parquet (id, split, group, kept, kept_id, cosine), the kept "
             "image of each group by --keep, and test images that repeat training images.",
        printer=_deduplicated),
    "curate": Command(
        CurateConfig, "medcurate.curate:curate", "selections",
        help="The main job: ingest → embed → select → report. Without SOURCE it runs on a "
             "built-in synthetic demo archive (clearly labelled as such)."),
    "score": Command(
        ScoreConfig, "medcurate.transfer.score:score", "scores",
        help="Rank a zoo of pretrained models for a target collection without fine-tuning: "
             "the paper's LP x FU score and 11 baseline metrics, as a table and CSV/JSON.",
        printer=_score_table),
    "pretrain": Command(
        PretrainConfig, "medcurate.train.pretrain:pretrain", "models",
        help="Pretrain a masked autoencoder (ViT) on a collection with Ray Train; the "
             "checkpoint lands in models/<name>/ and loads as the encoder mae:<path>."),
    "finetune": Command(
        FinetuneConfig, "medcurate.train.finetune:finetune", "models",
        help="Fine-tune (or linear-probe) a registry encoder + linear head on a selection or "
             "collection with Ray Train; AUC and balanced accuracy on every test set, "
             "published as models/<run>/ (model.pt, metrics.json/csv, predictions)."),
    "audit": Command(
        AuditConfig, "medcurate.train.audit:audit", "audits",
        help="Shortcut audit: train every zoo model with a synthetic or metadata confounder in "
             "a share p of the positives; i.i.d. vs o.o.d. (reversed) AUC per level, the drop, "
             "paired permutation tests, an HTML report and CSV under audits/<id>/."),
    "compare-selections": Command(
        CompareConfig, "medcurate.train.compare:compare_selections", "comparisons",
        help="Closed-loop check: select with several strategies at equal budgets and seeds, "
             "train on each, and report mean and 95% interval of each metric per strategy "
             "and budget (table, CSV, plot)."),
}


def command(kind: str) -> Command:
    if kind not in COMMANDS:
        raise MedcurateError(f"unknown command kind {kind!r}; kinds: {', '.join(COMMANDS)}")
    return COMMANDS[kind]


def run_command(kind: str, params: dict, workspace: Workspace) -> dict:
    """Validate ``params`` against the kind's schema and run it (pydantic errors propagate)."""
    entry = command(kind)
    return entry.run(entry.config(**params), workspace)
