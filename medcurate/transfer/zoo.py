"""A model zoo: the candidate encoders to rank for a target, read from a YAML file.

::

    models:                                  # or the list itself at the top level
      - name: imagenet-mobilenetv2           # unique; names the model in every output
        model: mobilenetv2-imagenet          # any encoder spec the registry takes
      - name: lite0-own-weights
        model: efficientnet-lite0-imagenet
        weights: weights/lite0.pth           # optional; relative to the zoo file
      - name: mae-breast
        model: mae:checkpoints/breast.pt     # relative to the zoo file
      - name: finetuned-brain
        model: model:brain-run               # a run of the workspace (medcurate finetune)

There are no per-model preprocessing overrides: features come from the embedding pipeline,
which embeds with each encoder's own preprocessing and records it in the run's provenance, so
an override would make the cached features disagree with their record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from medcurate.catalogue import MAE_PREFIX, mae_checkpoint, split_encoder_spec
from medcurate.errors import MedcurateError

ENTRY_KEYS = ("name", "model", "weights")
# Where classifier heads sit in the weights files of the registry's and timm's CNNs and ViTs.
_HEAD_NAMES = ("classifier.1", "classifier", "_fc", "fc", "head.fc", "head")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model: str
    weights: str | None = None


def _resolve(path: str, base: Path) -> str:
    return str(path) if "://" in path else str((base / Path(path).expanduser()).resolve())


def _entry(raw, index: int, base: Path) -> ZooEntry:
    if not isinstance(raw, dict):
        raise MedcurateError(f"zoo entry {index + 1} is not a mapping with name and model")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        raise MedcurateError(
            f"zoo entry {raw.get('name', index + 1)!r}: unknown key(s) "
            f"{', '.join(map(str, unknown))} (allowed: {', '.join(ENTRY_KEYS)}; preprocessing is "
            "each encoder's own)")
    for key in ("name", "model"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise MedcurateError(f"zoo entry {index + 1} needs a non-empty string {key!r}")
    model, weights = raw["model"].strip(), raw.get("weights")
    checkpoint = mae_checkpoint(model)
    if checkpoint is not None:
        model = MAE_PREFIX + _resolve(checkpoint, base)
    if weights is not None:
        if not isinstance(weights, str) or not weights.strip():
            raise MedcurateError(f"zoo entry {raw['name']!r}: weights must be a file path")
        weights = _resolve(weights.strip(), base)
    return ZooEntry(name=raw["name"].strip(), model=model, weights=weights)


def load_zoo(path: str) -> list[ZooEntry]:
    """The zoo's entries, with relative paths resolved against the zoo file's folder."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MedcurateError(f"zoo file not found: {path}")
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())  # one line: PyYAML's message spans several
        raise MedcurateError(f"zoo file {path} is not valid YAML: {detail}") from None
    if isinstance(document, dict) and set(document) == {"models"}:
        document = document["models"]
    if not isinstance(document, list):
        raise MedcurateError(f"zoo file {path} must hold a list of models (or 'models:' with "
                             "one), each with name and model")
    entries = [_entry(raw, i, file.resolve().parent) for i, raw in enumerate(document)]
    names = [entry.name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MedcurateError(f"zoo file {path}: model names must be unique ({', '.join(repeated)})")
    if len(entries) < 2:
        raise MedcurateError(f"zoo file {path} lists {len(entries)} model(s); ranking needs two "
                             "or more")
    return entries


def source_classifier(encoder) -> tuple[np.ndarray, np.ndarray] | None:
    """The source task's linear head ``(W [Z, D], b [Z])`` from the encoder's weights file, or
    None where there is none (random init, MAE, a head-less checkpoint).

    The registry builds every encoder without its head, and its features are exactly the
    head's input, so ``softmax(features @ W.T + b)`` are the source model's own predictions.
    """
    path = encoder.weights
    if encoder.spec.startswith("model:"):
        return _finetuned_head(path, encoder.embed_dim)
    if not path or split_encoder_spec(encoder.spec)[0] in ("mae", "random") or not os.path.isfile(path):
        return None
    from timm.models import load_state_dict

    state = load_state_dict(path)
    for name in _HEAD_NAMES:
        weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if (weight is not None and bias is not None and weight.ndim == 2
                and weight.shape[1] == encoder.embed_dim and bias.shape == weight.shape[:1]):
            return weight.float().numpy(), bias.float().numpy()
    return None


def _finetuned_head(location: str, embed_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The linear head of a ``medcurate finetune`` run's one model (``Classifier.head``:
    dropout, then this layer), read wherever the workspace keeps it; None for a pretrained
    MAE, which has no source task."""
    import io

    import torch

    from medcurate.workspace import resolve_filesystem

    fs, path = resolve_filesystem(location)
    with fs.open_input_stream(path) as stream:
        payload = torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)
    states = payload.get("states") or []
    if len(states) != 1:
        return None
    weight, bias = states[0].get("head.1.weight"), states[0].get("head.1.bias")
    if weight is None or bias is None or weight.shape[1] != embed_dim:
        return None
    return weight.float().numpy(), bias.float().numpy()
