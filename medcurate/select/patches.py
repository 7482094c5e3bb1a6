"""Patch extraction for OptiDEL's synthesis: the regions of one image worth pasting into another.

An extractor maps one image, float32 ``[C, H, W]`` in [0, 1] (what ``preprocess_batch`` gives
with mean 0 and std 1), to ``Patches``: boxes, optional masks, and each patch's content. Two
ship, chosen by a spec string (``make_extractor``):

* ``grid`` (no weights): the square cells of a regular grid of ``patch_size`` pixels.
* ``sam:PATH``: the regions of Segment Anything's automatic mask generator, the extractor of
  the OptiDEL paper, from a SAM checkpoint (needs the ``segment_anything`` package).

Both drop patches whose content is below ``min_content``. Content is the standard deviation of
a patch's pixels (over its mask, all channels): zero for a blank patch (the air around a chest
X-ray, an MRI's black border), larger for texture and edges. A blank patch gives a masked
autoencoder nothing to reconstruct, so pasting it would add no diversity.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcurate.errors import MedcurateError

SAM_TYPES = ("vit_h", "vit_l", "vit_b")  # segment_anything's model registry keys


@dataclass(frozen=True)
class Patches:
    """``boxes`` int64 [n, 4] (top, left, bottom, right; ends exclusive) in pixels of the image
    they came from; ``content`` float32 [n]; ``masks`` bool [n, H, W] where a patch is a
    segment rather than its whole box (SAM), else None."""

    boxes: np.ndarray
    content: np.ndarray
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def region(self, i: int, shape: tuple[int, int]) -> np.ndarray:
        """Patch ``i`` as a bool mask of an image of ``shape`` (H, W)."""
        if self.masks is not None:
            return self.masks[i]
        top, left, bottom, right = self.boxes[i]
        region = np.zeros(shape, dtype=bool)
        region[top:bottom, left:right] = True
        return region


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3) or min(image.shape[1:]) < 1:
        raise MedcurateError(f"patch extraction takes one image as [C, H, W] with 1 or 3 "
                             f"channels; got shape {image.shape}")
    return image.astype(np.float32, copy=False)


class GridExtractor:
    """Square cells of ``patch_size`` pixels (default: a quarter of the shorter side) on a
    grid from the top-left corner; a remainder narrower than a cell is left out. Cells with
    content below ``min_content`` are dropped. Deterministic."""

    def __init__(self, patch_size: int | None = None, min_content: float = 0.02):
        self.patch_size, self.min_content = patch_size, min_content

    def __call__(self, image) -> Patches:
        image = _check_image(image)
        channels, height, width = image.shape
        size = self.patch_size or max(1, min(height, width) // 4)
        if size > min(height, width):
            raise MedcurateError(f"patch size {size} exceeds the {height}x{width} image")
        rows, cols = height // size, width // size
        cells = image[:, :rows * size, :cols * size].reshape(channels, rows, size, cols, size)
        content = cells.std(axis=(0, 2, 4)).ravel()
        top, left = np.divmod(np.arange(rows * cols), cols)
        boxes = np.stack([top * size, left * size, top * size + size, left * size + size], 1)
        keep = content >= self.min_content
        return Patches(boxes=boxes[keep].astype(np.int64), content=content[keep])


class SamExtractor:
    """The regions of SAM's automatic mask generator, each with its mask; regions with
    content below ``min_content`` are dropped."""

    def __init__(self, checkpoint: str | None, min_content: float = 0.02):
        self.generator = _sam_generator(checkpoint)
        self.min_content = min_content

    def __call__(self, image) -> Patches:
        image = _check_image(image)
        rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
        found = self.generator.generate(
            np.round(rgb.transpose(1, 2, 0) * 255).astype(np.uint8))  # SAM takes HWC uint8
        masks = np.array([m["segmentation"] for m in found], dtype=bool).reshape(
            -1, *image.shape[1:])
        content = np.array([image[:, mask].std() for mask in masks], dtype=np.float32)
        boxes = np.array([(y, x, y + h, x + w) for x, y, w, h in
                          (np.round(m["bbox"]).astype(int) for m in found)],
                         dtype=np.int64).reshape(-1, 4)
        keep = content >= self.min_content
        return Patches(boxes=boxes[keep], content=content[keep], masks=masks[keep])


def _sam_generator(checkpoint: str | None):
    """SAM's automatic mask generator, or one MedcurateError naming everything missing."""
    missing = []
    if not checkpoint:
        missing.append("a checkpoint (--extractor sam:PATH, e.g. sam_vit_b_01ec64.pth from "
                       "the segment-anything release)")
    elif not Path(checkpoint).is_file():
        missing.append(f"a checkpoint file ({checkpoint} does not exist)")
    try:
        import segment_anything
    except ImportError:
        missing.append("the segment_anything package (pip install segment-anything), which "
                       "is not installed")
    if missing:
        raise MedcurateError(f"the SAM patch extractor needs {' and '.join(missing)}; "
                             "--extractor grid needs neither")
    model_type = next((t for t in SAM_TYPES if t in Path(checkpoint).name), None)
    if model_type is None:
        raise MedcurateError(f"cannot tell the SAM model from the file name {checkpoint}: it "
                             f"must contain one of {', '.join(SAM_TYPES)}, as the released "
                             "checkpoints' names do")
    model = segment_anything.sam_model_registry[model_type](checkpoint=checkpoint)
    return segment_anything.SamAutomaticMaskGenerator(model)


def make_extractor(spec: str = "grid", *, patch_size: int | None = None,
                   min_content: float = 0.02) -> GridExtractor | SamExtractor:
    """The extractor a spec names: ``grid`` or ``sam:CHECKPOINT``. Bad specs and parameters
    are MedcurateErrors, raised here, before any image is read."""
    if isinstance(min_content, bool) or not isinstance(min_content, numbers.Real) \
            or not 0 <= min_content < 1:
        raise MedcurateError(f"min_content must be a number in [0, 1); got {min_content!r}")
    if patch_size is not None and (isinstance(patch_size, bool) or
                                   not isinstance(patch_size, numbers.Integral) or patch_size < 1):
        raise MedcurateError(f"patch_size must be a positive integer; got {patch_size!r}")
    kind, _, checkpoint = str(spec).partition(":")
    if kind == "grid" and not checkpoint:
        return GridExtractor(patch_size, float(min_content))
    if kind == "sam":
        if patch_size is not None:
            raise MedcurateError("patch_size is for the grid extractor; SAM finds its own "
                                 "regions")
        return SamExtractor(checkpoint, float(min_content))
    raise MedcurateError(f"unknown patch extractor {spec!r}; use grid or sam:CHECKPOINT")


def paste(base: np.ndarray, donor: np.ndarray, patches: Patches, share: float,
          rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A copy of ``base`` with the donor's patches, in random order, pasted at their own
    places until they cover ``share`` of its area; returns it and the share covered.
    ``base`` and ``donor`` are [C, H, W] of one shape (the donor's patches index both)."""
    if base.shape != donor.shape:
        raise MedcurateError(f"base {base.shape} and donor {donor.shape} differ in shape")
    mixed = base.copy()
    covered = np.zeros(base.shape[1:], dtype=bool)
    for i in rng.permutation(len(patches)):
        if covered.mean() >= share:
            break
        region = patches.region(int(i), base.shape[1:])
        mixed[:, region] = donor[:, region]
        covered |= region
    return mixed, float(covered.mean())
