"""The main job: an archive (or the built-in demo) → collection → embeddings → near-duplicates
→ selection.

Each step reuses its artefact when the same step already ran with the same inputs, so the job
can be re-run after a crash or with a new budget without redoing the expensive parts. The dedup
step (on unless ``--no-dedup``) groups near-duplicate images and the selection leaves the
removed copies out, so no budget goes to them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from medcurate.config import (DEFAULT_ENCODER, CurateConfig, DedupConfig, EmbedConfig,
                              IngestConfig, SelectConfig)
from medcurate.dedup import dedup, default_dedup_id
from medcurate.demo import DEMO_NOTICE, make_demo_archive
from medcurate.embed import embed
from medcurate.ingest import ingest
from medcurate.provenance import input_of, outputs_digest
from medcurate.select.run import run_selection
from medcurate.workspace import Workspace, shaping_fields, validate_key

DEMO_MODEL = "mobilenetv2-imagenet"


def _say(message: str) -> None:
    print(f"[curate] {message}", file=sys.stderr)


def _collection(config: CurateConfig, workspace: Workspace) -> tuple[str, dict]:
    """Ingest the source, or reuse the collection an identical ingest made before."""
    ingest_config = IngestConfig(**config.model_dump(include=set(IngestConfig.model_fields)))
    name = ingest_config.name
    earlier = None if config.overwrite else workspace.reusable(
        "collections", name, ingest_config.model_dump(), shaping_fields(ingest_config),
        "pass --name NEW or --overwrite")
    if earlier is not None:
        _say(f"reusing collection {name!r} (same source and options)")
        return name, earlier["summary"]
    _say(f"ingesting {ingest_config.source} into collection {name!r}")
    return name, ingest(ingest_config, workspace)


def _dedup(run_id: str, workspace: Workspace) -> dict:
    """Near-duplicates of the run with ``medcurate dedup``'s defaults: the dedup made from this
    very run (same name, same outputs) is reused; any other of that name is replaced."""
    config = DedupConfig(embedding_run=run_id)
    key = default_dedup_id(config)
    if workspace.exists("dedups", key):
        record = workspace.provenance("dedups", key)
        made_from = input_of(record, "embedding_run").get("sha256")
        if made_from == outputs_digest(workspace.provenance("embeddings", run_id)):
            _say(f"reusing dedup {key!r} (same embedding run and settings)")
            return {**record["summary"], "reused": True}
    _say(f"finding near-duplicates in {run_id!r}")
    return {**dedup(config.model_copy(update={"overwrite": True}), workspace), "reused": False}


def _demo_archive(workspace: Workspace, seed: int) -> str:
    """The demo archive's location inside the workspace: on an object store it is written
    there too, since the nodes that decode its images share no disk with this one."""
    folder = f"{workspace.root}/demo-archive"
    if workspace.is_local:
        if not (Path(folder) / "metadata.csv").exists():
            make_demo_archive(Path(folder), seed=seed)
        return folder
    complete = f"{folder}/.uploaded"  # written after every file: a cut upload is redone
    if not workspace.is_file(complete):
        with tempfile.TemporaryDirectory() as scratch:
            make_demo_archive(Path(scratch), seed=seed)
            workspace.upload_folder(scratch, folder)
        workspace.write_bytes(complete, b"")
    return workspace.location(folder)


def curate(config: CurateConfig, workspace: Workspace | None = None) -> dict:
    workspace = workspace or Workspace()
    updates: dict = {}
    demo = config.source is None
    if demo:
        _say(DEMO_NOTICE)
        archive = _demo_archive(workspace, config.seed)
        updates = {"source": archive, "metadata": f"{archive}/metadata.csv",
                   "id_column": "file", "name": config.name or "demo",
                   "model": config.model or DEMO_MODEL}
    else:
        stem = Path(config.source.rstrip("/")).name.split(".")[0]
        updates = {"name": config.name or validate_key(stem.replace(" ", "_") or "collection"),
                   "model": config.model or DEFAULT_ENCODER}
    config = config.model_copy(update=updates)
    name, ingested = _collection(config, workspace)
    _say(f"embedding {name!r} with {config.model}")
    embedded = embed(EmbedConfig(collection=name, model=config.model, weights=config.weights),
                     workspace)
    deduped = _dedup(embedded["run_id"], workspace) if config.dedup else None
    _say(f"selecting {config.budget_per_class} per class (confounder-aware)")
    selection_config = SelectConfig(
        embedding_run=embedded["run_id"], budget_per_class=config.budget_per_class,
        seed=config.seed, exclude_duplicates=deduped["dedup_id"] if deduped else None,
        overwrite=True)
    selected = run_selection(selection_config, workspace)
    report = workspace.location(workspace.path("selections", selected["selection_id"],
                                                "report.html"))
    dedup_result = {"skipped": True} if deduped is None else {
        key: deduped[key] for key in ("dedup_id", "removed", "groups", "leaks", "reused")}
    result = {"demo": demo, "collection": name, "ingest": ingested, "embedding": embedded,
              "dedup": dedup_result,
              "selection": {k: v for k, v in selected.items() if k != "metadata"},
              "report": report}
    if demo:
        result["notice"] = DEMO_NOTICE
    near = ("near-duplicates not looked for (--no-dedup)" if deduped is None else
            f"{deduped['removed']} near-duplicates removed ({deduped['groups']} groups, "
            f"{deduped['leaks']} test images repeating training images; dedup "
            f"{deduped['dedup_id']!r})")
    _say(f"done: {ingested['ingested']} images in collection {name!r}; embeddings "
         f"{embedded['run_id']!r}; {near}; selected {selected['selected']} images into "
         f"selection {selected['selection_id']!r}; report {report}")
    return result
