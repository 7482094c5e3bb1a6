"""Turn decoded images into network input, the same way for every encoder.

This runs inside Ray Data CPU tasks, so it uses numpy and Pillow only: no torch import there.
Images arrive as ``load_image`` returns them: uint8 or uint16 ``(H, W)`` grey or ``(H, W, 3)``
RGB, or float32 in [0, 1] (DICOM after windowing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from medcurate.errors import MedcurateError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma, the weights Pillow's RGB -> "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """What an encoder expects as input; recorded in provenance so embeddings can be remade.

    ``mean``/``std`` are those of the model's pretraining, per input channel, in [0, 1] units.
    A single value is broadcast to all channels.
    """

    input_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if self.in_chans not in (1, 3):
            raise MedcurateError(f"encoders take 1 or 3 input channels, not {self.in_chans}")
        if int(self.input_size) <= 0:
            raise MedcurateError(f"input size must be positive, not {self.input_size}")
        for field in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, field))
            if len(values) == 1:
                values = values * self.in_chans
            if len(values) != self.in_chans:
                raise MedcurateError(f"{field} {values} does not match {self.in_chans} input channels")
            object.__setattr__(self, field, values)
        if any(s <= 0 for s in self.std):
            raise MedcurateError(f"std must be positive, not {self.std}")
        object.__setattr__(self, "input_size", int(self.input_size))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize"] = "bilinear, whole image, no crop"
        return d


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Pixel values in [0, 1] as float32: uint8 / 255, uint16 / 65535, floats as they are."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise MedcurateError(f"cannot preprocess images of dtype {image.dtype}: expected uint8, uint16 or float")


def _channels(image: np.ndarray, in_chans: int) -> list[np.ndarray]:
    """The image as ``in_chans`` (H, W) planes; grey becomes RGB by repetition later, after resizing."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return [image]
    if image.ndim == 3 and image.shape[2] == 3:
        if in_chans == 1:
            return [image @ _LUMA]
        return [image[:, :, c] for c in range(3)]
    raise MedcurateError(f"cannot preprocess an image of shape {image.shape}: expected (H, W) or (H, W, 3)")


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    # Pillow's 32-bit float mode keeps full precision; its bilinear filter widens its support when
    # shrinking, so large scans are averaged rather than aliased.
    resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def preprocess_batch(images: list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """A float32 batch ``[B, in_chans, S, S]``, normalised with the model's mean and std."""
    return normalise(unit_batch(images, prep), prep)


def unit_batch(images: list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """A float32 batch ``[B, in_chans, S, S]`` of pixels in [0, 1], not yet normalised: what
    a confounder is drawn on, and what pretraining measures its normalisation on.

    The whole image is resized to S x S without cropping: a centre crop would cut away borders
    where findings (and burnt-in markers, which curation must see) often sit.
    """
    size = prep.input_size
    batch = np.empty((len(images), prep.in_chans, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        planes = [_resize(p, size) for p in _channels(to_unit_float(np.asarray(image)), prep.in_chans)]
        batch[i] = np.stack(planes * (prep.in_chans // len(planes)))
    return batch


def normalise(batch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """``batch`` (from ``unit_batch``) with the model's mean subtracted and divided by its
    std, per channel, in place; returns it."""
    batch -= np.asarray(prep.mean, dtype=np.float32)[:, None, None]
    batch /= np.asarray(prep.std, dtype=np.float32)[:, None, None]
    return batch
