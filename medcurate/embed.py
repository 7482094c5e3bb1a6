"""Streaming, resumable embedding of a collection on Ray Data.

Decode and preprocessing run in CPU tasks; an actor pool holds the encoder (one actor per GPU
where GPUs exist) and embeds; the driver groups the rows it receives into fixed shards of the
manifest and commits each shard atomically as soon as it is complete. A killed run, started
again with the same command, embeds only the shards that were not committed; the final
embeddings are those of an uninterrupted run, since each shard is a fixed slice of the manifest.

Run layout: ``embeddings/<run-id>/run.json`` (plan and encoder, written first),
``shards/shard-NNNNN.parquet`` (id, label, split, row, embedding), ``provenance.json`` (last).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from medcurate.config import EmbedConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.ingest.decode import decode_preprocess, image_columns
from medcurate.provenance import InputRef, Provenance, utc_now
from medcurate.runtime import NodesSeen, ensure_ray, stage_resources, this_node
from medcurate.workspace import MAX_KEY_LENGTH, PROVENANCE_FILE, Workspace

RUN_FILE = "run.json"
SHARD_DIR = "shards"


def default_run_id(config: EmbedConfig, workspace: Workspace | None = None) -> str:
    """Same collection, model and weights → same run id, so re-running a command resumes it.
    A ``model:<run>`` spec counts by its weights' recorded sha256 (looked up in
    ``workspace``), so a run retrained under the same name embeds afresh."""
    from medcurate.models import workspace_weights_sha256

    slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in config.model).strip("-.")
    identity = [config.collection, config.model, config.weights, config.shard_size]
    if config.model.startswith("model:"):
        identity.append(workspace_weights_sha256(config.model, workspace))
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:8]
    run_id = f"{config.collection}--{slug[:80]}--{digest}"
    if len(run_id) > MAX_KEY_LENGTH:  # long names: shortened, the digest keeps them apart
        run_id = f"{config.collection[:60]}--{slug[:48]}--{digest}"
    return run_id


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


class _DecodeBatch:
    """Ray Data CPU task: decode and preprocess images into the encoder's input tensor."""

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return {"row": batch.column("row").to_numpy(),
                "pixels": decode_preprocess(batch.to_pydict(), self.preprocessing),
                "decode_node": np.full(batch.num_rows, this_node())}


class _EmbedActor:
    """Holds one encoder; embeds preprocessed batches (bf16 autocast on GPU)."""

    def __init__(self, model: str, weights: str | None, threads: int | None, workspace: str):
        import torch

        from medcurate.models import create_encoder

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = create_encoder(model, weights=weights, workspace=workspace).to(self.device)
        if self.device == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = torch.from_numpy(batch.pop("pixels"))
        with torch.inference_mode():
            if self.device == "cuda":
                pixels = pixels.pin_memory().to("cuda", non_blocking=True)
                pixels = pixels.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    features = self.encoder(pixels)
            else:
                features = self.encoder(pixels)
        batch["embedding"] = features.float().cpu().numpy()
        batch["embed_node"] = np.full(len(batch["row"]), this_node())
        return batch


def _shard_table(manifest: pa.Table, parts: list[dict[str, np.ndarray]], dim: int) -> pa.Table:
    """Rows in manifest order: only row numbers travel through Ray, the rest is joined here."""
    rows = np.concatenate([p["row"] for p in parts])
    order = np.argsort(rows, kind="stable")
    flat = np.concatenate([p["embedding"] for p in parts])[order].astype(np.float32).ravel()
    table = manifest.select(["id", "label", "split"]).take(pa.array(rows[order]))
    return table.append_column("row", pa.array(rows[order], pa.int64())).append_column(
        "embedding", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))


class EmbeddingRun:
    """One version folder of a run: its plan, which shards are committed, where they are."""

    def __init__(self, workspace: Workspace, run_id: str, folder: str):
        self.workspace, self.run_id, self.root = workspace, run_id, folder

    @classmethod
    def live(cls, workspace: Workspace, run_id: str) -> EmbeddingRun:
        """The published run (NotFound where there is none)."""
        return cls(workspace, run_id, workspace.require("embeddings", run_id))

    def plan(self) -> dict | None:
        path = f"{self.root}/{RUN_FILE}"
        return self.workspace.read_json(path) if self.workspace.is_file(path) else None

    def committed(self) -> set[int]:
        names = (info.base_name for info in self.workspace.listing(f"{self.root}/{SHARD_DIR}"))
        return {int(n[6:11]) for n in names if n.startswith("shard-") and n.endswith(".parquet")}

    def shard_path(self, index: int) -> str:
        return f"{self.root}/{SHARD_DIR}/{shard_name(index)}"


def load_embeddings(workspace: Workspace, run_id: str) -> tuple[pa.Table, np.ndarray]:
    """A finished run's rows (id, label, split, row) in manifest order, and its [N, D] matrix.

    The shards stream one at a time into one preallocated float32 matrix, so a million-row run
    costs the matrix plus one shard, never a second full copy through ``concat_tables``."""
    run = EmbeddingRun.live(workspace, run_id)
    summary = workspace.read_json(f"{run.root}/{PROVENANCE_FILE}")["summary"]
    matrix = np.empty((summary["rows"], summary["dim"]), dtype=np.float32)
    tables, offset = [], 0
    for index in sorted(run.committed()):
        shard = workspace.read_table(run.shard_path(index))
        for chunk in shard.column("embedding").chunks:
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            matrix[offset:offset + len(chunk)] = values.reshape(len(chunk), summary["dim"])
            offset += len(chunk)
        tables.append(shard.drop_columns(["embedding"]))
    if offset != summary["rows"]:
        raise MedcurateError(f"embedding run {run_id!r} holds {offset} rows, its provenance "
                             f"says {summary['rows']}: the run is damaged; embed it again "
                             "with --overwrite")
    return pa.concat_tables(tables), matrix


def _open_run(workspace: Workspace, run_id: str, plan: dict, overwrite: bool) -> EmbeddingRun:
    """The unfinished version of this run to resume, or a new one with the plan written first.
    An unfinished version of another plan is refused unless ``overwrite`` starts afresh."""
    if not overwrite:
        for version in reversed(workspace.drafts("embeddings", run_id)):
            run = EmbeddingRun(workspace, run_id,
                               workspace.version_folder("embeddings", run_id, version))
            previous = run.plan()
            if previous is None:
                continue  # killed before its plan was written: nothing to resume
            if {k: previous.get(k) for k in plan} != plan:
                raise MedcurateError(
                    f"embedding run {run_id!r} has an unfinished version with another plan "
                    "(different config, encoder or collection); pass --overwrite or another "
                    "--run-id")
            return run
    run = EmbeddingRun(workspace, run_id, workspace.new_draft("embeddings", run_id))
    workspace.write_json(f"{run.root}/{RUN_FILE}", {**plan, "started_at": utc_now()})
    return run


def embed(config: EmbedConfig, workspace: Workspace | None = None) -> dict:
    """Embed a collection into ``embeddings/<run-id>/``, resuming a run that was cut short."""
    from medcurate.models import create_encoder

    workspace = workspace or Workspace()
    run_id = config.run_id or default_run_id(config, workspace)
    finished = workspace.existing("embeddings", run_id, config.overwrite)
    if finished:
        return {**finished["summary"], "reused": True}
    manifest = read_manifest(workspace, config.collection)
    # fails early on bad specs
    encoder = create_encoder(config.model, weights=config.weights, workspace=workspace)
    description = encoder.describe()
    collection_record = workspace.provenance("collections", config.collection)
    plan = {"run_id": run_id, "config": config.model_dump(), "encoder": description,
            "rows": manifest.num_rows, "shard_size": config.shard_size,
            "shards": -(-manifest.num_rows // config.shard_size),
            "collection_manifest_sha256":
                collection_record["outputs"][MANIFEST_FILE]["sha256"]}
    run = _open_run(workspace, run_id, plan, config.overwrite)
    done = run.committed()
    pending = [i for i in range(plan["shards"]) if i not in done]
    if done:
        print(f"resuming {run_id}: {len(done)} of {plan['shards']} shards already committed",
              file=sys.stderr)
    timing = {}
    if pending:
        timing = _embed_shards(config, run, manifest, pending, encoder.preprocessing,
                               description["embed_dim"])
    summary = {"run_id": run_id, "collection": config.collection, "model": config.model,
               "rows": manifest.num_rows, "dim": description["embed_dim"],
               "shards": plan["shards"], "resumed_shards": len(done), "timing": timing}
    record = Provenance(kind="embedding", key=run_id, started_at=run.plan()["started_at"],
                        config=config.model_dump(),
                        inputs=[InputRef(role="collection", uri=config.collection,
                                         sha256=plan["collection_manifest_sha256"])],
                        model=description, summary=summary)
    workspace.write_json(f"{run.root}/{PROVENANCE_FILE}", record.model_dump())
    workspace.publish("embeddings", run_id, run.root, overwrite=config.overwrite)
    return summary


def _embed_shards(config: EmbedConfig, run: EmbeddingRun, manifest: pa.Table,
                  pending: list[int], preprocessing, dim: int) -> dict:
    """Embed the pending shards; returns start-up time and steady-state throughput."""
    start = time.monotonic()
    ensure_ray()
    size = config.shard_size
    table = manifest.select(image_columns(manifest)).append_column(
        "row", pa.array(np.arange(manifest.num_rows), pa.int64()))
    decode = stage_resources("decode")
    model = stage_resources("embed", config.batch_size)
    shards = {i: table.slice(i * size, size) for i in pending}
    expected = {i: shard.num_rows for i, shard in shards.items()}
    # One input block per model batch: results stream back, and shards commit, batch by batch.
    blocks = [shard.slice(start, model.batch_size) for shard in shards.values()
              for start in range(0, shard.num_rows, model.batch_size)]
    # Ray sets OMP_NUM_THREADS from a worker's CPU share (1 here), which throttles torch's
    # OpenMP kernels even after set_num_threads; the actor's threads are its to use. The same
    # environment on the decode step keeps the two fusable where their CPUs match.
    env = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(model.threads)}}} \
        if model.threads else {}
    dataset = (
        ray.data.from_arrow(blocks)
        .map_batches(_DecodeBatch(preprocessing), batch_format="pyarrow",
                     batch_size=model.batch_size, num_cpus=decode.num_cpus, **env)
        .map_batches(_EmbedActor, fn_constructor_args=(config.model, config.weights,
                                                       model.threads,
                                                       run.workspace.worker_root),
                     batch_format="numpy", batch_size=model.batch_size,
                     num_cpus=model.num_cpus, num_gpus=model.num_gpus,
                     concurrency=model.concurrency, **env)
    )
    buffers: dict[int, list] = {}
    counts = dict.fromkeys(expected, 0)
    total = sum(expected.values())
    progress = tqdm(total=total, desc=f"embed {run.run_id}", unit="img", file=sys.stderr,
                    disable=None)
    embedded, first, nodes = 0, None, NodesSeen()
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        nodes.take("decode", batch["decode_node"])
        nodes.take("embed", batch["embed_node"])
        if first is None:  # Ray, actors and the model are up: steady state starts here
            first, first_rows = time.monotonic(), len(batch["row"])
        shards = batch["row"] // size
        for index in np.unique(shards):
            mask = shards == index
            part = {name: batch[name][mask] for name in ("row", "embedding")}
            buffers.setdefault(int(index), []).append(part)
            counts[int(index)] += int(mask.sum())
            if counts[int(index)] == expected[int(index)]:
                run.workspace.write_table(run.shard_path(int(index)),
                                          _shard_table(manifest, buffers.pop(int(index)), dim))
                if progress.disable:
                    rate = (embedded + int(mask.sum())) / max(time.monotonic() - start, 1e-9)
                    print(f"committed shard {int(index)} ({rate:.1f} images/s)", file=sys.stderr)
        embedded += len(batch["row"])
        progress.update(len(batch["row"]))
    progress.close()
    missing = [i for i, n in counts.items() if n != expected[i]]
    if missing:
        raise RuntimeError(f"embedding lost rows in shards {missing}; rerun to finish them")
    end = time.monotonic()
    steady = (total - first_rows) / max(end - first, 1e-9) if total > first_rows else None
    timing = {"total_s": round(end - start, 3), "startup_s": round(first - start, 3),
              "steady_images_per_s": None if steady is None else round(steady, 2),
              "nodes": nodes.as_dict()}
    print(f"embedded {total} images in {timing['total_s']} s (start-up {timing['startup_s']} s, "
          f"then {timing['steady_images_per_s']} images/s)", file=sys.stderr)
    return timing
