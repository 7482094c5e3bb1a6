"""The encoder zoo of the transferability and robustness studies (issue 9): two ImageNet CNNs,
two MAEs this project pretrains on different real collections, and a random init.

``ensure_zoo`` pretrains the MAEs through the library's own ``pretrain`` (or reuses them from
the workspace: each model's name carries a digest of its settings) and writes the zoo YAML that
``medcurate score`` and ``medcurate audit`` read.
"""

from __future__ import annotations

from pathlib import Path

from _study import Timings, ensure_collection, ensure_pretrained, ingest_config, study_inputs

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


def ensure_zoo(workspace, data: Path, timings: Timings,
               quick: bool = False) -> tuple[Path, list[dict]]:
    """(zoo YAML path, its entries with name, model, source and pretraining settings)."""
    import yaml

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
    path = study_inputs(workspace.root) / ("zoo-quick.yaml" if quick else "zoo.yaml")
    text = yaml.safe_dump({"models": [{"name": e["name"], "model": e["model"]}
                                      for e in entries]}, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path, entries
