"""A small Masked Autoencoder (He et al., 2022) for self-supervised pretraining on a collection.

Why MAE: a collection with few or no labels can still teach an encoder what its images look
like, and the encoder then embeds that collection better than an ImageNet model that never saw
ultrasound or X-ray. The encoder is a plain timm ``VisionTransformer`` so the rest of medcurate
treats it like any other timm backbone.

Design choices:

* Pooling is the mean of the final-layer-normed patch tokens (no class token). The MAE loss
  never supervises a class token directly, so after a short pretraining a class token carries
  little; the average of patch tokens is the stronger linear-probe feature.
* Position embeddings are fixed 2-D sin-cos (frozen), for encoder and decoder.
* The decoder is light (2-4 blocks, width 128-192): it exists only for pretraining and is
  dropped by :func:`load_mae_encoder`.
* The loss is the MSE on masked patches only, against per-patch normalised pixels
  (``norm_pix_loss``), which the MAE paper found gives better representations.
* Inputs are already normalised with the model's ``mean``/``std`` (stored in the checkpoint so
  whoever embeds with the encoder normalises exactly as pretraining did).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from medcurate.errors import MedcurateError

CHECKPOINT_FORMAT = "medcurate-mae/1"

ARCHS: dict[str, dict[str, Any]] = {
    "mae-vit-tiny": dict(embed_dim=192, depth=12, num_heads=3,
                         decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "mae-vit-small": dict(embed_dim=384, depth=12, num_heads=6,
                          decoder_dim=192, decoder_depth=4, decoder_heads=6),
}
# Keys of ARCHS entries plus these may be overridden in build_mae (e.g. depth for CPU runs).
_OVERRIDABLE = {"mlp_ratio", "mask_ratio", "norm_pix_loss"} | set(ARCHS["mae-vit-tiny"])
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25


def _sincos(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, shape [1, h*w, dim], in patch (row-major) order."""
    return build_sincos2d_pos_embed(list(grid), dim=dim).unsqueeze(0)


def _build_encoder(config: dict[str, Any]) -> VisionTransformer:
    """The feature extractor: patches -> transformer -> LayerNorm -> mean over tokens."""
    encoder = VisionTransformer(
        img_size=config["img_size"], patch_size=config["patch_size"],
        in_chans=config["in_chans"], num_classes=0, global_pool="avg", class_token=False,
        fc_norm=False,  # LayerNorm each token (the decoder needs normed tokens), then average
        embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
        mlp_ratio=config["mlp_ratio"], qkv_bias=True,
    )
    with torch.no_grad():
        encoder.pos_embed.copy_(_sincos(encoder.patch_embed.grid_size, config["embed_dim"]))
    encoder.pos_embed.requires_grad_(False)
    return encoder


class MAE(nn.Module):
    """ViT encoder plus a light decoder that reconstructs the masked patches.

    ``config`` holds everything needed to rebuild the network; ``mean``/``std`` are the input
    normalisation the model is trained with (one value per channel).
    """

    def __init__(self, *, arch: str, img_size: int, patch_size: int, in_chans: int,
                 embed_dim: int, depth: int, num_heads: int, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int, mlp_ratio: float = 4.0,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.config = dict(arch=arch, img_size=img_size, patch_size=patch_size,
                           in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, decoder_dim=decoder_dim,
                           decoder_depth=decoder_depth, decoder_heads=decoder_heads,
                           mlp_ratio=mlp_ratio, mask_ratio=mask_ratio,
                           norm_pix_loss=norm_pix_loss)
        self.mean = tuple(float(v) for v in (mean or (DEFAULT_MEAN,) * in_chans))
        self.std = tuple(float(v) for v in (std or (DEFAULT_STD,) * in_chans))
        if len(self.mean) != in_chans or len(self.std) != in_chans:
            raise MedcurateError(f"mean and std need {in_chans} value(s), one per channel")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss

        self.encoder = _build_encoder(self.config)
        grid = self.encoder.patch_embed.grid_size
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", _sincos(grid, decoder_dim), persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                  norm_layer=nn.LayerNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                       self.decoder_pred]:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    nn.init.zeros_(sub.bias)

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def encoder_module(self) -> VisionTransformer:
        """The encoder as a feature extractor ([B,C,S,S] -> [B,D]); shares this model's weights."""
        return self.encoder

    # -- pieces of the forward pass ------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C], patches in the same order as the patch embedding."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def kept_count(self, mask_ratio: float) -> int:
        return max(1, int(round(self.num_patches * (1.0 - mask_ratio))))

    def random_masking(self, x: torch.Tensor, mask_ratio: float,
                       generator: torch.Generator | None = None):
        """Keep a random subset of tokens per sample (argsort of uniform noise).

        Returns the kept tokens [B, K, D], the mask [B, L] (1 = masked, i.e. to reconstruct)
        and ``ids_restore`` that puts a shuffled sequence back in patch order.
        """
        b, length, dim = x.shape
        keep = self.kept_count(mask_ratio)
        noise = torch.rand(b, length, device=x.device, generator=generator)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        return kept, mask.gather(1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float,
                        generator: torch.Generator | None = None):
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        x = enc.norm(enc.blocks(x))
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        b, keep, dim = x.shape
        masked = self.mask_token.expand(b, ids_restore.shape[1] - keep, -1)
        x = torch.cat([x, masked], dim=1)
        x = x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        x = self.decoder_blocks(x + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only; visible patches contribute nothing."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None):
        """Returns ``(loss, pred [B, L, p*p*C], mask [B, L])``."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_mae(arch: str, img_size: int, patch_size: int, in_chans: int,
              **overrides: Any) -> MAE:
    """An MAE of a named architecture; ``overrides`` change e.g. ``depth``, ``mean``, ``std``."""
    if arch not in ARCHS:
        raise MedcurateError(f"unknown MAE architecture {arch!r} (known: {', '.join(ARCHS)})")
    unknown = set(overrides) - _OVERRIDABLE - {"mean", "std"}
    if unknown:
        raise MedcurateError(f"cannot override {sorted(unknown)} of an MAE "
                             f"(can: {', '.join(sorted(_OVERRIDABLE | {'mean', 'std'}))})")
    if img_size <= 0 or patch_size <= 0 or img_size % patch_size:
        raise MedcurateError(f"img_size {img_size} must be a positive multiple of "
                             f"patch_size {patch_size}")
    if in_chans not in (1, 3):
        raise MedcurateError(f"in_chans must be 1 or 3, got {in_chans}")
    settings = {**ARCHS[arch], **overrides}
    if settings["embed_dim"] % 4 or settings["decoder_dim"] % 4:
        raise MedcurateError("embed_dim and decoder_dim must be multiples of 4 (sin-cos embedding)")
    if not 0.0 < settings.get("mask_ratio", 0.75) < 1.0:
        raise MedcurateError("mask_ratio must lie strictly between 0 and 1")
    return MAE(arch=arch, img_size=img_size, patch_size=patch_size, in_chans=in_chans, **settings)


def checkpoint_bytes(model: MAE, meta: dict) -> bytes:
    """The whole MAE (config, normalisation, weights, ``meta``) as one file's bytes.

    ``meta`` must be JSON-like (it is loaded back with ``torch.load(weights_only=True)``).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.config["arch"],
        "config": dict(model.config),
        "mean": list(model.mean),
        "std": list(model.std),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": json.loads(json.dumps(meta)),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_checkpoint(model: MAE, path: str | os.PathLike, meta: dict) -> None:
    """Write :func:`checkpoint_bytes` to a local file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_bytes(checkpoint_bytes(model, meta))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint from a local path or an object-store URI (models published into an
    ``s3://`` workspace are read from there, on whichever node embeds)."""
    from medcurate.workspace import resolve_filesystem

    fs, resolved = resolve_filesystem(str(path))
    try:
        with fs.open_input_stream(resolved) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError):
        raise MedcurateError(f"no MAE checkpoint at {path}") from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise MedcurateError(f"{path} is not a medcurate MAE checkpoint "
                             f"(cannot be read by torch.load: {type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise MedcurateError(f"{path} is not a medcurate MAE checkpoint "
                             f"(expected format {CHECKPOINT_FORMAT!r})")
    return payload


def load_mae_encoder(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The pretrained encoder only, in eval mode: float [B,C,S,S] -> pooled features [B,D].

    Inputs must be normalised with the returned ``mean``/``std`` (per channel, applied to pixels
    scaled to [0, 1]), as in pretraining.
    """
    payload = _read_checkpoint(path)
    config = payload["config"]
    encoder = _build_encoder(config)
    state = {k[len("encoder."):]: v for k, v in payload["state_dict"].items()
             if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise MedcurateError(f"{path}: encoder weights do not match its config: {exc}") from None
    info = {
        "arch": payload["arch"],
        "embed_dim": config["embed_dim"],
        "img_size": config["img_size"],
        "patch_size": config["patch_size"],
        "in_chans": config["in_chans"],
        "mean": list(payload["mean"]),
        "std": list(payload["std"]),
        "meta": payload["meta"],
    }
    return encoder.eval(), info
