"""The encoder zoos of the transferability and robustness studies (issues 9 and 18).

- ``ensure_zoo``, the mixed-architecture zoo: two ImageNet CNNs, two MAEs this project
  pretrains on different real collections, and a random init. The MAEs come from the library's
  own ``pretrain`` (or are reused from the workspace: each name carries a digest of its
  settings).
- ``ensure_source_zoo``, the paper's dataset-level setting: one architecture (MobileNetV2)
  whose sources differ only in data: its ImageNet weights, and those weights fine-tuned
  (``medcurate finetune``, the study's one protocol) on a sample of each shared collection,
  loaded back as ``model:<run>`` encoders whose provenance names their source collection.

Each writes the zoo YAML that ``medcurate score`` and ``medcurate audit`` read.
"""

from __future__ import annotations

from pathlib import Path

from _study import (Timings, ensure_collection, ensure_finetuned, ensure_pretrained,
                    ingest_config, split_samples, study_inputs)

# The MAEs: one on chest X-rays, one on brain MRI, both ViT-tiny (depth 4) at 64 px with 8-px
# patches on a seeded 3,000-image subset of the train split, 10 epochs: the README's tested
# recipe (which beats random init in linear-probe AUC) at the input size every zoo model can
# take, so an audit trains all five at one size. Grey-scale (in_chans 1): both collections are
# grey, and the embedding pipeline converts colour targets.
MAES = {
    "mae-pneumoniamnist": {"collection": "pneumoniamnist", "img_size": 64, "patch_size": 8,
                           "depth": 4, "epochs": 10, "max_images": 3000},
    "mae-brain-mri": {"collection": "brain-tumor-mri", "img_size": 64, "patch_size": 8,
                      "depth": 4, "epochs": 10, "max_images": 3000},
}
QUICK_MAE = {"epochs": 2, "max_images": 600}  # smoke runs: a barely trained MAE is enough
# One fine-tuning protocol for the source models and for the fine-tuned ground truth: every
# layer trains, at 64 px (the MAEs' size; the CNNs at 224 px would take hours here), with the
# paper's augmentation, AdamW, early stopping on a stratified 20% validation share.
FINETUNE = {"mode": "full", "img_size": 64, "augment": True, "epochs": 15, "patience": 3,
            "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 32, "val_fraction": 0.2,
            "metrics": ["auc"], "folds": 1}
QUICK_FINETUNE = {"epochs": 2, "patience": 1}
# The one-architecture zoo's sources: ImageNet MobileNetV2 fine-tuned on up to 200 training
# images per class of each collection (seed 0).
SOURCE_ARCH = "mobilenetv2-imagenet"
SOURCE_COLLECTIONS = ["brain-tumor-mri", "ham10000-iid", "pneumoniamnist", "breastmnist"]
SOURCE_SAMPLE = {"per_class": 200, "seed": 0}
QUICK_SOURCE_SAMPLE = {"per_class": 40, "seed": 0}
FIXED = [
    {"name": "imagenet-mobilenetv2", "model": "mobilenetv2-imagenet", "source": "ImageNet"},
    {"name": "imagenet-efficientnet-lite0", "model": "efficientnet-lite0-imagenet",
     "source": "ImageNet"},
    {"name": "random-mobilenetv2", "model": "random/mobilenetv2", "source": "none (random init)"},
]


def pretrain_config(name: str, quick: bool):
    from medcurate.config import PretrainConfig

    settings = {**MAES[name], **(QUICK_MAE if quick else {})}
    config = PretrainConfig(arch="mae-vit-tiny", in_chans=1, seed=0, **settings)
    return config.model_copy(update={"name": f"{name}-{config.digest('name')}"})


def ensure_mae(name: str, workspace, data: Path, timings: Timings, quick: bool) -> Path:
    """The checkpoint of one zoo MAE, pretrained now unless the workspace has it."""
    config = pretrain_config(name, quick)
    ensure_collection(ingest_config(config.collection, data, study_inputs(workspace.root)), workspace,
                      timings)
    return ensure_pretrained(config, workspace, timings)


def write_zoo(workspace, name: str, entries: list[dict]) -> Path:
    """The zoo YAML ``medcurate score`` reads (name and model of each entry) as
    ``<study inputs>/<name>``, rewritten only when its text changes."""
    import yaml

    path = study_inputs(workspace.root) / name
    text = yaml.safe_dump({"models": [{"name": e["name"], "model": e["model"]}
                                      for e in entries]}, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def ensure_zoo(workspace, data: Path, timings: Timings,
               quick: bool = False) -> tuple[Path, list[dict]]:
    """(zoo YAML path, its entries with name, model, source and pretraining settings)."""
    entries = [dict(entry) for entry in FIXED]
    for name in MAES:
        checkpoint = ensure_mae(name, workspace, data, timings, quick)
        config = pretrain_config(name, quick)
        entries.insert(len(entries) - 1, {
            "name": name, "model": f"mae:{checkpoint}",
            "source": f"MAE pretrained here on {config.collection}",
            "pretraining": config.model_dump(include={"collection", "img_size", "patch_size",
                                                      "depth", "epochs", "max_images"}),
            "pretrain_s": timings.get(f"pretrain/{config.name}")})
    return write_zoo(workspace, "zoo-quick.yaml" if quick else "zoo.yaml", entries), entries


def finetune_protocol(quick: bool) -> dict:
    return {**FINETUNE, **(QUICK_FINETUNE if quick else {})}


def finetune_config(model: str, train: str, test: list[str], seed: int, quick: bool):
    """The study's fine-tuning run of ``model`` on collection ``train``, named by what it
    trains (model, data, seed, protocol digest) so a re-run or another setting reuses it."""
    from medcurate.config import FinetuneConfig

    config = FinetuneConfig(train=train, model=model, test=test, seed=seed,
                            **finetune_protocol(quick))
    slug = "".join(c if c.isalnum() else "-" for c in model.split(":")[-1])[-40:]
    return config.model_copy(update={
        "run_id": f"study-ft-{train[:66]}-{slug}-s{seed}-{config.digest('run_id')}"})


def ensure_source_zoo(workspace, data: Path, timings: Timings,
                      quick: bool = False) -> tuple[Path, list[dict]]:
    """(zoo YAML path, entries) of the one-architecture zoo: ImageNet MobileNetV2 and one
    copy of it fine-tuned on each of ``SOURCE_COLLECTIONS``."""
    sample = QUICK_SOURCE_SAMPLE if quick else SOURCE_SAMPLE
    entries = [{"name": "mobilenetv2-imagenet", "model": SOURCE_ARCH, "source": "ImageNet"}]
    for collection in SOURCE_COLLECTIONS:
        ensure_collection(ingest_config(collection, data, study_inputs(workspace.root)),
                          workspace, timings)
        train = split_samples(workspace, collection, {"train": sample["per_class"]},
                              sample["seed"], "source")["train"]
        config = finetune_config(SOURCE_ARCH, train, [], 0, quick)
        document = ensure_finetuned(config, workspace, timings)
        entries.append({"name": f"mobilenetv2-{collection}", "model": f"model:{config.run_id}",
                        "source": f"ImageNet, then supervised on {document['images']['train']} "
                                  f"images of {collection}",
                        "pretrain_s": timings.get(f"finetune/{config.run_id}")})
    name = "zoo-one-architecture-quick.yaml" if quick else "zoo-one-architecture.yaml"
    return write_zoo(workspace, name, entries), entries
