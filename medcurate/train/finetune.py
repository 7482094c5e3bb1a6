"""Fine-tuning a classifier on Ray Train: registry backbone + dropout 0.5 + a linear head.

``fit_classifier`` is one training run: Ray Data decodes (and, for the shortcut audit,
confounds) the images in CPU tasks; a ``TorchTrainer`` worker group trains with AdamW and
early stopping on the validation loss; rank 0 keeps the best epoch's weights and predicts every
test set; the checkpoint (weights + predictions) lands in Ray Train storage under the
workspace's ``jobs/``. ``finetune`` (the CLI command) wraps it: training rows from a selection
or a collection, folds, metrics, and the published ``models/<run>/`` artefact.

A linear probe without augmentation runs the frozen backbone once per image and then trains
the head on the cached features (``train_head``), the same loop the selection comparison uses
on stored embeddings.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from medcurate.config import FinetuneConfig, TrainingConfig
from medcurate.dedup_use import DedupUse, for_collection, in_ids, read_dedup
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE, read_manifest
from medcurate.ingest.decode import IMAGE_COLUMNS, decode_preprocess, with_image_columns
from medcurate.models import Preprocessing, create_encoder
from medcurate.models.classifier import MODEL_FILE, Classifier, make_head
from medcurate.models.preprocess import normalise
from medcurate.provenance import InputRef, OutputRef, Provenance, input_of, utc_now
from medcurate.runtime import ensure_ray, stage_resources, training_gpu
from medcurate.tables import records_csv
from medcurate.train.evaluation import check_metrics, classification_metrics, fold_plan
from medcurate.train.ray_fit import fit_on_ray
from medcurate.workspace import PROVENANCE_FILE, Scratch, Workspace

RESULT_FILE = "result.pt"
METRICS_FILE = "metrics.json"
METRICS_CSV = "metrics.csv"
METRICS_HEADER = ["fold", "test_set", "metric", "value"]
PREDICTIONS_FILE = "predictions.parquet"
VALIDATION = "validation"
_BLOCK_ROWS = 256
_MATERIALIZE_BYTES = 2 << 30  # decoded sets below this are decoded once, not every epoch


# -- the model ----------------------------------------------------------------------------------
def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 15.0,
                  translate: float = 0.1, shear: float = 10.0,
                  zoom: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Per-image random rotation, shift (share of the side), shear and zoom, border-filled."""
    n = x.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = torch.deg2rad(uniform(-degrees, degrees))
    shear_angle = torch.deg2rad(uniform(-shear, shear))
    scale = uniform(*zoom)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear_angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (cos * tan - sin) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, (sin * tan + cos) / scale
    theta[:, :, 2] = 2 * torch.stack([uniform(-translate, translate),
                                      uniform(-translate, translate)], dim=1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def train_head(head: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
               val: tuple[torch.Tensor, torch.Tensor], settings: dict,
               report=None) -> tuple[dict, list[dict]]:
    """Train a head on fixed features with early stopping; the best state and the history."""
    generator = torch.Generator().manual_seed(settings["seed"])
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings["lr"],
                                  weight_decay=settings["weight_decay"])
    features, targets = train
    best, best_state, waited, history = math.inf, copy.deepcopy(head.state_dict()), 0, []
    for epoch in range(settings["epochs"]):
        head.train()
        order = torch.randperm(len(targets), generator=generator)
        total = 0.0
        for start in range(0, len(order), settings["batch_size"]):
            batch = order[start:start + settings["batch_size"]]
            loss = F.cross_entropy(head(features[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        head.eval()
        with torch.no_grad():
            val_loss = float(F.cross_entropy(head(val[0]), val[1]))
        entry = {"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss}
        history.append(entry)
        if report:
            report(entry)
        if val_loss < best - 1e-6:
            best, best_state, waited = val_loss, copy.deepcopy(head.state_dict()), 0
        else:
            waited += 1
            if waited >= settings["patience"]:
                break
    return best_state, history


# -- data (Ray Data CPU tasks) ------------------------------------------------------------------
def _decode_batch(batch: pa.Table, prep: Preprocessing, confounder: str | None,
                  seed: int) -> dict[str, np.ndarray]:
    """Rows -> normalised inputs; a confounder, where set, is applied to the resized [0, 1]
    image before normalisation, seeded per image id so every epoch and model sees the same."""
    rows = batch.to_pydict()
    pixels = decode_preprocess(rows, prep, normalised=False)
    if confounder:
        from medcurate.confounders import apply_confounder, row_seed

        for i, (image_id, flag) in enumerate(zip(rows["id"], rows["confounded"])):
            image = pixels[i].transpose(1, 2, 0)
            image = image[:, :, 0] if prep.in_chans == 1 else image
            changed = apply_confounder(confounder, image, confounded=bool(flag),
                                       seed=row_seed(seed, image_id))
            pixels[i] = changed.reshape(prep.input_size, prep.input_size, -1).transpose(2, 0, 1)
    return {"image": normalise(pixels, prep),
            "target": np.asarray(rows["target"], dtype=np.int64),
            "index": np.asarray(rows["index"], dtype=np.int64)}


def image_table(rows: pa.Table, targets: np.ndarray, confounded: np.ndarray | None = None) -> pa.Table:
    """The columns training reads: image location, class index, position, confounder flag."""
    columns = with_image_columns(rows)
    flags = np.zeros(rows.num_rows, bool) if confounded is None else np.asarray(confounded, bool)
    return pa.table({"id": rows.column("id"), **{c: columns.column(c) for c in IMAGE_COLUMNS},
                     "target": pa.array(np.asarray(targets, dtype=np.int64)),
                     "index": pa.array(np.arange(rows.num_rows, dtype=np.int64)),
                     "confounded": pa.array(flags)})


def _dataset(table: pa.Table, prep: Preprocessing, confounder: str | None, seed: int):
    decode = stage_resources("decode")
    blocks = [table.slice(i, _BLOCK_ROWS) for i in range(0, max(table.num_rows, 1), _BLOCK_ROWS)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        _decode_batch, batch_format="pyarrow", batch_size=decode.batch_size,
        num_cpus=decode.num_cpus, fn_kwargs={"prep": prep, "confounder": confounder,
                                             "seed": seed})
    size = table.num_rows * prep.in_chans * prep.input_size ** 2 * 4
    return dataset.materialize() if size < _MATERIALIZE_BYTES else dataset


def frozen_features(model: str, weights: str | None, prep: Preprocessing, table: pa.Table,
                    confounder: str | None = None, seed: int = 0, batch_size: int = 64, *,
                    workspace: str | None = None) -> np.ndarray:
    """The frozen backbone's features of ``image_table`` rows, in row order, decoded in this
    process exactly as the Ray Train workers decode them (confounder included): for linear
    probes that reuse the same images under many settings, so each image runs once.
    ``workspace`` (a root URI) is where a ``model:<run>`` spec is found."""
    encoder = create_encoder(model, weights=weights, workspace=workspace)
    backbone = encoder.backbone.eval()
    out = []
    with torch.no_grad():
        for start in range(0, table.num_rows, batch_size):
            batch = _decode_batch(table.slice(start, batch_size), prep, confounder, seed)
            out.append(backbone(torch.from_numpy(batch["image"])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.embed_dim), np.float32)


def fit_head(features: dict[str, tuple[np.ndarray, np.ndarray]], n_classes: int,
             training: TrainingConfig, seed: int, tests: dict[str, np.ndarray]) -> FitResult:
    """A linear probe on fixed features, as the Ray Train loop trains one (same head, same
    seeding, same early stopping): ``features`` holds (x, y) of 'train' and 'val'."""
    torch.manual_seed(seed)
    x, y = features["train"]
    head = make_head(x.shape[1], n_classes)
    settings = {**training.model_dump(include={"epochs", "patience", "batch_size", "lr",
                                               "weight_decay"}), "seed": seed}
    as_tensors = {k: (torch.from_numpy(np.ascontiguousarray(a, np.float32)),
                      torch.from_numpy(np.array(b, np.int64))) for k, (a, b) in features.items()}
    state, history = train_head(head, as_tensors["train"], as_tensors["val"], settings)
    head.load_state_dict(state)
    head.eval()
    with torch.no_grad():
        predictions = {k: torch.softmax(head(torch.from_numpy(np.ascontiguousarray(
            v, np.float32))), dim=1).numpy() for k, v in tests.items()}
    return FitResult(state=state, history=history, predictions=predictions)


# -- the training loop (runs in each Ray Train worker) -------------------------------------------
def _batches(dataset, batch_size: int, device, shuffle_seed: int | None = None):
    kwargs = {}
    if shuffle_seed is not None:
        kwargs = {"local_shuffle_buffer_size": 8 * batch_size, "local_shuffle_seed": shuffle_seed}
    yield from dataset.iter_torch_batches(batch_size=batch_size, device=device,
                                          dtypes={"image": torch.float32, "target": torch.int64,
                                                  "index": torch.int64}, **kwargs)


def _features(backbone: nn.Module, dataset, batch_size: int, device) -> tuple[torch.Tensor, ...]:
    feats, targets, index = [], [], []
    with torch.no_grad():
        for batch in _batches(dataset, batch_size, device):
            feats.append(backbone(batch["image"]).float())
            targets.append(batch["target"])
            index.append(batch["index"])
    return torch.cat(feats), torch.cat(targets), torch.cat(index)


def _predict(model: nn.Module, dataset, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, index = [], []
    with torch.no_grad():
        for batch in _batches(dataset, batch_size, device):
            probs.append(torch.softmax(model(batch["image"]).float(), dim=1).cpu())
            index.append(batch["index"].cpu())
    order = torch.cat(index).argsort()
    return torch.cat(probs)[order].numpy(), torch.cat(index)[order].numpy()


def _epoch(model, optimizer, dataset, loop, device, generator, epoch) -> float:
    model.train()
    if loop["mode"] == "linear":  # frozen backbone: batch-norm statistics stay as trained
        (model.module if hasattr(model, "module") else model).backbone.eval()
    total, count = 0.0, 0
    for batch in _batches(dataset, loop["batch_size"], device, loop["seed"] + epoch):
        images = batch["image"]
        if loop["augment"]:
            images = random_affine(images, generator)
        loss = F.cross_entropy(model(images), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(images), count + len(images)
    return total / max(count, 1)


def _validation_loss(model, dataset, batch_size, device) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(dataset, batch_size, device):
            loss = F.cross_entropy(model(batch["image"]), batch["target"], reduction="sum")
            total, count = total + float(loss), count + len(batch["target"])
    return total / max(count, 1)


def _log_epoch(entry: dict) -> None:
    """Progress on the worker's stdout (streamed to the driver and the job log). Not a Ray
    Train report: each report costs ~2 s here, longer than a linear-probe epoch."""
    print(f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}, "
          f"val loss {entry['val_loss']:.4f}", flush=True)


def _train_loop(loop: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(loop["seed"])
    encoder = create_encoder(loop["model"], weights=loop["weights"], workspace=loop["workspace"])
    model = Classifier(encoder.backbone, encoder.embed_dim, loop["n_classes"]).to(device)
    train, val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    single = ray.train.get_context().get_world_size() == 1
    if loop["mode"] == "linear" and not loop["augment"] and single:
        model.eval()  # frozen features, computed once; the head trains on them
        train_feats = _features(model.backbone, train, loop["batch_size"], device)
        val_feats = _features(model.backbone, val, loop["batch_size"], device)
        state, history = train_head(model.head, train_feats[:2], val_feats[:2], loop,
                                    _log_epoch)
        model.head.load_state_dict(state)
    else:
        if loop["mode"] == "linear":
            for parameter in model.backbone.parameters():
                parameter.requires_grad_(False)
        model = ray.train.torch.prepare_model(model)
        bare = model.module if hasattr(model, "module") else model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=loop["lr"], weight_decay=loop["weight_decay"])
        generator = torch.Generator().manual_seed(loop["seed"] * 7919 + rank)
        best, best_state, waited, history = math.inf, copy.deepcopy(bare.state_dict()), 0, []
        for epoch in range(loop["epochs"]):
            train_loss = _epoch(model, optimizer, train, loop, device, generator, epoch)
            val_loss = _validation_loss(bare, val, loop["batch_size"], device)
            entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
            history.append(entry)
            _log_epoch(entry)
            if val_loss < best - 1e-6:
                best, best_state, waited = val_loss, copy.deepcopy(bare.state_dict()), 0
            else:
                waited += 1
                if waited >= loop["patience"]:  # every worker sees the same val loss
                    break
        model = bare
        model.load_state_dict(best_state)

    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if rank == 0:
            predictions = {name: _predict(model, ray.train.get_dataset_shard(f"test:{name}"),
                                          loop["batch_size"], device)
                           for name in loop["tests"]}
            torch.save({"state": model.state_dict(), "history": history,
                        "predictions": predictions}, os.path.join(folder, RESULT_FILE))
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"epochs": len(history)}, checkpoint=saved)


# -- one training run (driver) --------------------------------------------------------------------
@dataclass(frozen=True)
class FitResult:
    state: dict
    history: list[dict]
    predictions: dict[str, np.ndarray]  # test name -> probabilities [N, K] in table order


def preprocessing_for(model: str, weights: str | None, img_size: int | None, *,
                      workspace: str | None = None) -> Preprocessing:
    """The encoder's input, at ``img_size`` where given, checked by one forward pass so a
    size the network cannot take fails here rather than inside a worker."""
    encoder = create_encoder(model, weights=weights, workspace=workspace)
    prep = encoder.preprocessing
    if img_size and img_size != prep.input_size:
        prep = Preprocessing(img_size, prep.in_chans, prep.mean, prep.std)
        try:
            with torch.no_grad():
                encoder(torch.zeros(1, prep.in_chans, img_size, img_size))
        except Exception as exc:  # noqa: BLE001 - whatever the network says, it cannot take it
            raise MedcurateError(f"--img-size {img_size}: {model} cannot take that input "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return prep


def fit_classifier(model: str, weights: str | None, training: TrainingConfig, n_classes: int,
                   train: pa.Table, val: pa.Table, tests: dict[str, pa.Table], *,
                   prep: Preprocessing, storage: Scratch, name: str,
                   confounder: str | None = None, seed: int | None = None,
                   workspace: str | None = None) -> FitResult:
    """One Ray Train run over ``image_table`` rows; predictions for every test table.
    ``workspace`` (a root URI the workers can open) is where a ``model:<run>`` start is found:
    the workers may not share the driver's environment or working directory."""
    ensure_ray()
    use_gpu = training_gpu(training.num_workers, training.use_gpu)
    seed = training.seed if seed is None else seed
    datasets = {"train": _dataset(train, prep, confounder, seed),
                "val": _dataset(val, prep, confounder, seed)}
    datasets.update({f"test:{k}": _dataset(t, prep, confounder, seed) for k, t in tests.items()})
    loop = {"model": model, "weights": weights, "workspace": workspace,
            "n_classes": n_classes, "mode": training.mode,
            "augment": training.augment, "epochs": training.epochs,
            "patience": training.patience, "batch_size": training.batch_size,
            "lr": training.lr, "weight_decay": training.weight_decay, "seed": seed,
            "tests": list(tests)}
    payload = fit_on_ray(_train_loop, loop, datasets, num_workers=training.num_workers,
                         use_gpu=use_gpu, storage=storage, name=name, result_file=RESULT_FILE,
                         what="training",
                         dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
                         weights_only=False)
    storage.delete(name)
    return FitResult(state=payload["state"], history=payload["history"],
                     predictions={k: probs for k, (probs, _) in payload["predictions"].items()})


# -- the finetune command ---------------------------------------------------------------------
def split_rows(manifest: pa.Table, split: str) -> pa.Table:
    if "split" not in manifest.column_names:
        return manifest.slice(0, 0)
    return manifest.filter(pc.equal(manifest["split"], split))


def training_source(workspace: Workspace, key: str) -> tuple[str, pa.Table, bool]:
    """(collection, training rows, whether they are a selection) for a selection or collection."""
    is_selection = workspace.exists("selections", key)
    if is_selection and workspace.exists("collections", key):
        raise MedcurateError(f"{key!r} names both a selection and a collection; rename one")
    if is_selection:
        from medcurate.select.run import selection_rows

        return (*selection_rows(workspace, key), True)
    if not workspace.exists("collections", key):
        raise MedcurateError(f"no selection or collection named {key!r} in the workspace")
    manifest = read_manifest(workspace, key)
    train = split_rows(manifest, "train")
    return key, (train if train.num_rows else manifest), False


def test_sets(workspace: Workspace, collection: str,
              specs: list[str]) -> dict[str, tuple[str, pa.Table]]:
    """Named test tables from ``SPLIT``, ``COLLECTION`` or ``COLLECTION:SPLIT`` specs, each
    with the collection it is drawn from (a dedup's leaks name images of one collection)."""
    manifest = read_manifest(workspace, collection)
    if not specs:
        test = split_rows(manifest, "test")
        return {"test": (collection, test)} if test.num_rows else {}
    tables = {}
    for spec in specs:
        name, _, split = spec.partition(":")
        if not split and not workspace.exists("collections", name):
            origin, table = collection, split_rows(manifest, name)  # a training split
        else:
            workspace.require("collections", name)
            table = read_manifest(workspace, name)
            origin, table = name, split_rows(table, split) if split else table
        if table.num_rows == 0:
            raise MedcurateError(f"test set {spec!r} has no images (a split of {collection!r}, "
                                 "a collection, or COLLECTION:SPLIT)")
        tables[spec] = (origin, table)
    return tables


def training_dedup(workspace: Workspace, dedup_id: str, train: str, collection: str,
                   is_selection: bool) -> DedupUse:
    """The dedup ``finetune --exclude-duplicates`` honours. Training on a selection: a dedup
    of the embedding run the selection was made from, the version it read (the selection's
    provenance names it). On a collection, which has no run: a dedup of a live run of that
    collection (``for_collection``), matched by image id."""
    if not is_selection:
        return for_collection(workspace, dedup_id, collection)
    ref = input_of(workspace.provenance("selections", train), "embedding_run")
    return read_dedup(workspace, dedup_id, ref.get("uri"), ref.get("sha256"),
                      reader=f"selection {train!r}")


def without_duplicates(used: DedupUse, rows: pa.Table, tests: dict[str, tuple[str, pa.Table]],
                       collection: str) -> tuple[pa.Table, dict[str, pa.Table], dict]:
    """The training rows less the near-duplicates ``used`` removed, the test sets less the
    test images it reports as leaks (only sets drawn from the training collection, whose ids
    its leaks name), and what was dropped, for the model's record. A test set left empty is
    an error: nothing would be evaluated."""
    drop = in_ids(rows.column("id"), used.removed)
    kept, dropped = {}, {}
    for name, (origin, table) in tests.items():
        leaked = in_ids(table.column("id"), used.leaked) if origin == collection \
            else np.zeros(table.num_rows, bool)
        if leaked.all():
            raise MedcurateError(f"--exclude-duplicates: every image of test set {name!r} "
                                 f"repeats a training image (dedup {used.dedup_id!r}); "
                                 "nothing is left to test on")
        kept[name], dropped[name] = table.filter(pa.array(~leaked)), int(leaked.sum())
    if drop.all():
        raise MedcurateError(f"--exclude-duplicates: dedup {used.dedup_id!r} removed every "
                             "training image")
    return rows.filter(pa.array(~drop)), kept, used.record(train_dropped=int(drop.sum()),
                                                           test_dropped=dropped)


def label_targets(table: pa.Table, classes: list[str], what: str) -> np.ndarray:
    labels = [None if v is None else str(v) for v in table.column("label").to_pylist()]
    unknown = sorted({str(v) for v in labels if v not in classes})
    if unknown:
        raise MedcurateError(f"{what} has labels the training data lacks: {', '.join(unknown)}")
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[v] for v in labels], dtype=np.int64)


def classes_of(rows: pa.Table, training: TrainingConfig) -> tuple[list[str], int]:
    """Sorted class names of the training rows and the positive class's index, validated."""
    labels = rows.column("label").to_pylist()
    if any(v is None for v in labels):
        raise MedcurateError("training images must all be labelled")
    classes = sorted({str(v) for v in labels})
    if len(classes) < 2:
        raise MedcurateError(f"training needs two or more classes; found {classes}")
    check_metrics(training.metrics, len(classes))
    positive = training.positive if training.positive is not None else classes[1]
    if positive not in classes:
        raise MedcurateError(f"--positive {positive!r} is not a class ({', '.join(classes)})")
    return classes, classes.index(positive)


def default_run_id(config: FinetuneConfig) -> str:
    model = config.model.replace("/", "-").replace(":", "-").split("-")[-1][:40]
    return f"{config.train[:60]}-{model}-{config.mode}-s{config.seed}-{config.digest('run_id')}"


def metric_rows(fold: int, name: str, values: dict) -> list[dict]:
    return [{"fold": fold, "test_set": name, "metric": k, "value": v} for k, v in values.items()]


def finetune(config: FinetuneConfig, workspace: Workspace | None = None) -> dict:
    """Fine-tune (or linear-probe) on a selection or collection; publish ``models/<run>/``."""
    workspace = workspace or Workspace()
    started = utc_now()
    run_id = config.run_id or default_run_id(config)
    workspace.existing("models", run_id, config.overwrite, "--run-id NEW")
    collection, rows, is_selection = training_source(workspace, config.train)
    tests = test_sets(workspace, collection, config.test)
    used = training_dedup(workspace, config.exclude_duplicates, config.train, collection,
                          is_selection) if config.exclude_duplicates else None
    if used:
        rows, tests, duplicates = without_duplicates(used, rows, tests, collection)
    else:
        tests, duplicates = {k: table for k, (_, table) in tests.items()}, None
    classes, positive = classes_of(rows, config)
    targets = label_targets(rows, classes, "training data")
    test_targets = {k: label_targets(t, classes, f"test set {k!r}") for k, t in tests.items()}
    prep = preprocessing_for(config.model, config.weights, config.img_size,
                             workspace=workspace.worker_root)
    val_split = split_rows(read_manifest(workspace, collection), "val")
    if config.folds == 1 and val_split.num_rows:
        plans = [(np.arange(rows.num_rows), None)]
    else:
        plans = fold_plan(targets, config.folds, config.val_fraction, config.seed)
    storage = workspace.scratch(run_id)

    records, predictions, states, histories = [], [], [], []
    for fold, (train_at, val_at) in enumerate(plans):
        if val_at is None:
            val_rows, val_targets = val_split, label_targets(val_split, classes, "'val' split")
        else:
            val_rows, val_targets = rows.take(val_at), targets[val_at]
        result = fit_classifier(
            config.model, config.weights, config, len(classes),
            image_table(rows.take(train_at), targets[train_at]),
            image_table(val_rows, val_targets),
            {VALIDATION: image_table(val_rows, val_targets),
             **{k: image_table(t, test_targets[k]) for k, t in tests.items()}},
            prep=prep, storage=storage, name=f"fold-{fold}", seed=config.seed + fold,
            workspace=workspace.worker_root)
        evaluated = {VALIDATION: (val_rows, val_targets),
                     **{k: (t, test_targets[k]) for k, t in tests.items()}}
        for name, (table, y) in evaluated.items():
            probs = result.predictions[name]
            records += metric_rows(fold, name, classification_metrics(y, probs, config.metrics,
                                                                      positive))
            predictions.append(pa.table({
                "fold": pa.array(np.full(len(y), fold, np.int32)),
                "test_set": pa.array([name] * len(y)), "id": table.column("id"),
                "label": pa.array([classes[i] for i in y]),
                **{f"p_{c}": pa.array(probs[:, i]) for i, c in enumerate(classes)}}))
        states.append(result.state)
        histories.append(result.history)
    storage.delete()

    summary = _summarise(records, config.metrics)
    document = {"run_id": run_id, "train": config.train, "collection": collection,
                "from_selection": is_selection, "classes": classes,
                "positive": classes[positive], "images": {"train": rows.num_rows, **{
                    k: t.num_rows for k, t in tests.items()}},
                "metrics": summary, "folds": len(plans),
                "epochs_trained": [len(h) for h in histories], "history": histories,
                **({"duplicates": duplicates} if duplicates else {})}
    with workspace.stage("models", run_id, overwrite=config.overwrite) as staging:
        buffer = io.BytesIO()
        torch.save({"states": states, "model": config.model, "weights": config.weights,
                    "classes": classes, "preprocessing": prep.to_dict(), "mode": config.mode},
                   buffer)
        workspace.write_bytes(f"{staging}/{MODEL_FILE}", buffer.getvalue())
        workspace.write_json(f"{staging}/{METRICS_FILE}", document)
        workspace.write_bytes(f"{staging}/{METRICS_CSV}", records_csv(records, METRICS_HEADER))
        workspace.write_table(f"{staging}/{PREDICTIONS_FILE}", pa.concat_tables(predictions))
        record = Provenance(
            kind="model", key=run_id, started_at=started, config=config.model_dump(),
            inputs=[InputRef(role="selection" if is_selection else "collection",
                             uri=config.train),
                    InputRef(role="collection", uri=workspace.path("collections", collection),
                             sha256=workspace.provenance("collections", collection)
                             ["outputs"][MANIFEST_FILE]["sha256"]),
                    *([used.input_ref()] if used else [])],
            outputs={MODEL_FILE: OutputRef(sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
                                           bytes=len(buffer.getvalue()))},
            model={"spec": config.model, "weights": config.weights, "classes": classes,
                   "preprocessing": prep.to_dict()},
            seed=config.seed, summary={k: v for k, v in document.items() if k != "history"})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return {k: v for k, v in document.items() if k != "history"}


def _summarise(records: list[dict], metrics: list[str]) -> dict:
    """Per test set and metric: the mean over folds and each fold's value."""
    from medcurate.train.evaluation import mean_interval

    summary: dict[str, dict] = {}
    for name in dict.fromkeys(r["test_set"] for r in records):
        summary[name] = {}
        for metric in metrics:
            values = [r["value"] for r in records if r["test_set"] == name and r["metric"] == metric]
            summary[name][metric] = {**mean_interval(values), "folds": values}
    return summary
