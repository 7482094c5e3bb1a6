"""Self-supervised MAE pretraining of a collection's images on Ray Train.

Ray Data decodes and preprocesses images in CPU tasks while a ``TorchTrainer`` worker group
trains; each epoch ends in a Ray Train checkpoint under ``jobs/<run>/``, so re-running the same
command after a crash resumes from the last finished epoch (the run name is a hash of the
config and the collection's content, so a changed config starts afresh). The published model
is one file, ``models/<name>/model.pt`` (see :mod:`medcurate.models.mae`), with its
``provenance.json`` written last; the Ray checkpoints are deleted once it is published.

Input normalisation: the per-channel mean and std of pixels scaled to [0, 1], measured on a
seeded sample of the collection (``NORM_SAMPLE`` images), rather than fixed constants: medical
archives differ widely in brightness (dark MRI backgrounds, bright X-ray fields), and the
values are stored in the checkpoint so embedding normalises exactly as pretraining did.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch

from medcurate.config import PretrainConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.ingest.decode import decode_preprocess, with_image_columns
from medcurate.models.mae import build_mae, checkpoint_bytes
from medcurate.models.preprocess import Preprocessing
from medcurate.provenance import InputRef, Provenance, utc_now
from medcurate.runtime import ensure_ray, stage_resources, training_gpu
from medcurate.train.ray_fit import fit_on_ray
from medcurate.workspace import PROVENANCE_FILE, Workspace

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
NORM_SAMPLE = 256
_BLOCK_ROWS = 256  # Ray Data blocks, so several decode tasks can run in parallel


# -- data ---------------------------------------------------------------------------------------
def _decode_batch(batch: dict[str, np.ndarray], prep: Preprocessing) -> dict[str, np.ndarray]:
    """Ray Data UDF: manifest rows -> normalised inputs, prepared exactly as for embedding."""
    return {"image": decode_preprocess(batch, prep)}


def _normalisation(table: pa.Table, config: PretrainConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of [0, 1] pixels over a seeded sample of the training images."""
    rng = np.random.default_rng(config.seed)
    take = np.sort(rng.choice(table.num_rows, min(NORM_SAMPLE, table.num_rows), replace=False))
    rows = table.take(take).to_pydict()
    unscaled = Preprocessing(config.img_size, config.in_chans, (0.0,), (1.0,))
    pixels = decode_preprocess(rows, unscaled, normalised=False)
    mean = pixels.mean(axis=(0, 2, 3))
    std = np.maximum(pixels.std(axis=(0, 2, 3)), 1e-3)  # a constant image must not divide by 0
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _selection_images(workspace: Workspace, config: PretrainConfig) -> tuple[list[pa.Table],
                                                                              list[InputRef]]:
    """The selection's images and those it synthesised, with their provenance references."""
    from medcurate.select.run import selection_rows

    workspace.require("selections", config.selection)
    collection, rows = selection_rows(workspace, config.selection)
    if collection != config.collection:
        raise MedcurateError(f"selection {config.selection!r} was made from collection "
                             f"{collection!r}, not {config.collection!r}")
    ids = "\n".join(sorted(rows.column("id").to_pylist())).encode()
    tables = [rows]
    inputs = [InputRef(role="selection", uri=workspace.path("selections", config.selection),
                       sha256=hashlib.sha256(ids).hexdigest())]
    synthetic = workspace.provenance("selections", config.selection)["summary"].get(
        "synthetic_collection")
    if synthetic:
        tables.append(read_manifest(workspace, synthetic))
        inputs.append(InputRef(role="synthetic_collection",
                               uri=workspace.path("collections", synthetic),
                               sha256=_collection_sha256(workspace, synthetic)))
    return tables, inputs


def _training_rows(workspace: Workspace, config: PretrainConfig) -> tuple[pa.Table,
                                                                           list[InputRef]]:
    """The rows to train on (decode columns only) and the inputs they come from: the
    collection's 'train' split (every image where it has none), or a selection's images."""
    workspace.require("collections", config.collection)
    inputs = [InputRef(role="collection", uri=workspace.path("collections", config.collection),
                       sha256=_collection_sha256(workspace, config.collection))]
    if config.selection:
        tables, more = _selection_images(workspace, config)
        inputs += more
    else:
        table = read_manifest(workspace, config.collection)
        if "split" in table.column_names and pc.any(pc.equal(table["split"], "train")).as_py():
            table = table.filter(pc.equal(table["split"], "train"))
        tables = [table]
    table = pa.concat_tables([with_image_columns(t) for t in tables])
    # A seeded shuffle, so a manifest sorted by class still gives mixed batches (Ray Data only
    # shuffles within a local buffer), and so max_images takes a random subset.
    order = np.random.default_rng(config.seed).permutation(table.num_rows)
    return table.take(order[:config.max_images]).combine_chunks(), inputs


# -- the training loop (runs in each Ray Train worker) -------------------------------------------
def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_loop(loop: dict) -> None:
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(loop["seed"])  # identical initialisation on every worker
    model = build_mae(**loop["model"])

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": loop["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=loop["lr"], betas=(0.9, 0.95))
    total = loop["epochs"] * loop["steps_per_epoch"]
    warmup = int(loop["warmup_epochs"] * loop["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup, total))

    start_epoch, losses = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume an interrupted run of the same config
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu",
                               weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, losses = state["epoch"] + 1, state["losses"]

    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    use_bf16 = device.type == "cuda"
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, loop["epochs"]):
        torch.manual_seed(loop["seed"] * 100_003 + epoch * 101 + rank)  # masks, resumable
        model.train()
        total_loss = torch.zeros(2, device=device)
        for batch in shard.iter_torch_batches(
                batch_size=loop["batch_size"], dtypes=torch.float32, device=device,
                local_shuffle_buffer_size=4 * loop["batch_size"],
                local_shuffle_seed=loop["seed"] + epoch):
            images = batch["image"]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, _, _ = model(images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += torch.stack([loss.detach().float() * len(images),
                                       torch.tensor(float(len(images)), device=device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total_loss)
        epoch_loss = float(total_loss[0] / total_loss[1].clamp(min=1))
        losses.append(epoch_loss)
        metrics = {"epoch": epoch, "loss": epoch_loss, "lr": scheduler.get_last_lr()[0]}
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "losses": losses}, os.path.join(folder, STATE_FILE))
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)


# -- the driver ---------------------------------------------------------------------------------
def _collection_sha256(workspace: Workspace, collection: str) -> str | None:
    outputs = workspace.provenance("collections", collection).get("outputs", {})
    return (outputs.get(MANIFEST_FILE) or {}).get("sha256")


def _run_name(config: PretrainConfig, inputs: list[InputRef]) -> str:
    """Same config and same input content -> same run, which Ray Train resumes."""
    settings = config.model_dump(exclude={"overwrite", "use_gpu", "num_workers"})
    contents = [ref.sha256 for ref in inputs]
    digest = hashlib.sha256(json.dumps([settings, contents], sort_keys=True).encode())
    return f"pretrain-{config.model_name[:100]}-{digest.hexdigest()[:12]}"


def pretrain(config: PretrainConfig, workspace: Workspace | None = None) -> dict:
    """Pretrain an MAE on a collection and publish it as ``models/<name>/``; returns a summary."""
    workspace = workspace or Workspace()
    started = utc_now()
    name = config.model_name
    ensure_ray()
    use_gpu = training_gpu(config.num_workers, config.use_gpu)
    table, inputs = _training_rows(workspace, config)
    if table.num_rows == 0:
        raise MedcurateError(f"collection {config.collection!r} has no images to train on")
    run_name = _run_name(config, inputs)
    mean, std = _normalisation(table, config)

    model_args = dict(arch=config.arch, img_size=config.img_size, patch_size=config.patch_size,
                      in_chans=config.in_chans, mask_ratio=config.mask_ratio, mean=mean, std=std)
    if config.depth:
        model_args["depth"] = config.depth
    decode = stage_resources("decode")
    blocks = [table.slice(i, _BLOCK_ROWS) for i in range(0, table.num_rows, _BLOCK_ROWS)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        _decode_batch, batch_format="numpy", batch_size=decode.batch_size,
        num_cpus=decode.num_cpus,
        fn_kwargs={"prep": Preprocessing(config.img_size, config.in_chans, mean, std)})
    rows_per_worker = math.ceil(table.num_rows / config.num_workers)
    loop = dict(model=model_args, epochs=config.epochs, batch_size=config.batch_size,
                lr=config.lr, warmup_epochs=config.warmup_epochs,
                weight_decay=config.weight_decay, seed=config.seed,
                steps_per_epoch=math.ceil(rows_per_worker / config.batch_size))
    storage = workspace.scratch(run_name)

    with workspace.stage("models", name, overwrite=config.overwrite) as staging:
        state = fit_on_ray(_train_loop, loop, {"train": dataset},
                           num_workers=config.num_workers, use_gpu=use_gpu, storage=storage,
                           name=run_name, result_file=STATE_FILE, what="pretraining")
        model = build_mae(**model_args)
        model.load_state_dict(state["model"])
        losses = [round(v, 6) for v in state["losses"]]
        summary = {"final_loss": losses[-1], "epochs": len(losses), "losses": losses,
                   "images": table.num_rows, "run": run_name, "use_gpu": use_gpu}
        workspace.write_bytes(f"{staging}/{MODEL_FILE}", checkpoint_bytes(
            model, meta={"collection": config.collection, "name": name, **summary}))
        record = Provenance(
            kind="model", key=name, started_at=started, config=config.model_dump(),
            inputs=inputs,
            model={**model.config, "mean": mean, "std": std},
            seed=config.seed, summary=summary)
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    storage.delete()  # published: the resume points are spent
    return {"name": name,
            "checkpoint": workspace.location(workspace.path("models", name, MODEL_FILE)),
            "mean": mean, "std": std, **summary}
