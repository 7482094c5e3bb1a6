"""Synthetic confounders (shortcuts) planted in a labelled collection, to test robustness.

Ported from Juodelyte et al., "Source Matters: Source Dataset Impact on Model Robustness in
Medical Imaging" (reference code: github.com/DovileDo/source-matters, ``include_tag.py``,
``include_lowpass.py``, ``include_noise.py``, ``gender.py``). The training set correlates a
confounder with the positive class; the out-of-distribution test set reverses it, so a model
that learnt the shortcut instead of the pathology loses accuracy there.

The paper's constants are for ~1024 px chest X-rays; here images are already resized to the
model's square input size S, so lengths are scaled by S / 1024. Images are float32 arrays in
[0, 1], (S, S) grey or (S, S, 3) RGB. Pure numpy on purpose: it runs inside Ray Data CPU tasks.
"""

from __future__ import annotations

import hashlib

import numpy as np

from medcurate.catalogue import IMAGE_CONFOUNDERS
from medcurate.errors import MedcurateError

ROLES = ("train", "iid", "ood")
PAPER_SIZE = 1024

POISSON_N0_CLEAN = 2e7  # photons per pixel for every image
POISSON_N0_CONFOUNDED = 1.5e7  # fewer photons, more noise: the shortcut is the noise level
MU_WATER, MU_AIR = 0.1837, 0.1662  # the paper's attenuation constants (per pixel)
HU_WINDOW = (-1200.0, 800.0)  # display window the [0, 1] intensities are mapped onto

# The letter "R", 5 wide and 7 high: nearest-neighbour scaled to the tag box, no font files.
_R_GLYPH = np.array([[c == "#" for c in row] for row in (
    "####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#")])


def _checked(image) -> np.ndarray:
    """A float64 copy of a square grey or RGB image; the caller's array is never touched."""
    img = np.array(image, dtype=np.float64)
    if img.ndim not in (2, 3) or img.shape[0] != img.shape[1]:
        raise MedcurateError(f"confounders need a square (S, S) or (S, S, C) image, "
                             f"got shape {img.shape}")
    return img


def _out(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def tag_box(size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the "R" on an S x S image.

    The paper draws a 64 px "R" at (200, 200) of a 1024 px image; both scale with S. The height
    is at least 7 px, so the 5 x 7 glyph stays a readable R at small S (at S=64 it would be 4).
    """
    top = left = round(200 * size / PAPER_SIZE)
    height = max(_R_GLYPH.shape[0], round(64 * size / PAPER_SIZE))
    width = max(_R_GLYPH.shape[1], round(height * _R_GLYPH.shape[1] / _R_GLYPH.shape[0]))
    if top + height > size or left + width > size:
        raise MedcurateError(f"image size {size} is too small for the tag")
    return top, left, height, width


def add_tag(image) -> np.ndarray:
    """Burn a white letter "R" into a fixed spot, like a radiographer's laterality marker."""
    img = _checked(image)
    top, left, height, width = tag_box(img.shape[0])
    rows = np.arange(height) * _R_GLYPH.shape[0] // height
    cols = np.arange(width) * _R_GLYPH.shape[1] // width
    glyph = _R_GLYPH[rows][:, cols]
    img[top:top + height, left:left + width][glyph] = 1.0
    return _out(img)


def _lowpass_unclipped(img: np.ndarray) -> np.ndarray:
    size = img.shape[0]
    diameter = 500 * size / PAPER_SIZE
    centre = size // 2  # where fftshift puts the zero frequency
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - centre) ** 2 + (xx - centre) ** 2 <= (diameter / 2) ** 2
    planes = img[..., None] if img.ndim == 2 else img
    out = np.empty_like(planes)
    for c in range(planes.shape[-1]):
        spectrum = np.fft.fftshift(np.fft.fft2(planes[..., c]))
        out[..., c] = np.real(np.fft.ifft2(np.fft.ifftshift(spectrum * disk)))
    return out.reshape(img.shape)


def lowpass(image) -> np.ndarray:
    """The paper's "denoising": drop spatial frequencies outside a centred disk.

    Per channel: 2-D FFT, fftshift, keep a disk of diameter 500/1024 * S (zero elsewhere),
    inverse FFT, real part, clip. The zero frequency is kept, so is the mean (up to clipping).
    It looks like a smoother, differently processed scan: a shortcut no human would notice.
    """
    return _out(_lowpass_unclipped(_checked(image)))


def poisson_noise(image, n0: float, rng: np.random.Generator) -> np.ndarray:
    """CT-like photon (quantum) noise; fewer photons ``n0`` per pixel give a noisier image.

    The paper's steps, on [0, 1] intensities x (grey or each RGB channel independently):
    dequantise x + U[-0.5, 0.5)/255 (the paper adds U[0, 1) to 8-bit values and floors at the
    end: the same net zero shift); HU = -1200 + 2000 x (window [-1200, 800]);
    mu = MU_WATER + HU (MU_WATER - MU_AIR) / 1000; counts ~ Poisson(n0 exp(-mu));
    mu' = -log(max(counts / n0, 1e-8)); HU' = 1000 (mu' - MU_WATER) / (MU_WATER - MU_AIR);
    back to x' = (HU' + 1200) / 2000, clipped to [0, 1]. The paper first resizes to 512 px; we
    work at S, the noise is per pixel either way.
    """
    if not n0 > 0:
        raise MedcurateError(f"the photon count n0 must be positive, got {n0}")
    img = _checked(image)
    img += rng.uniform(-0.5, 0.5, size=img.shape) / 255.0
    low, high = HU_WINDOW
    hu = low + img * (high - low)
    mu = MU_WATER + hu * (MU_WATER - MU_AIR) / 1000.0
    counts = rng.poisson(n0 * np.exp(-mu))
    mu_noisy = -np.log(np.maximum(counts / n0, 1e-8))
    hu_noisy = 1000.0 * (mu_noisy - MU_WATER) / (MU_WATER - MU_AIR)
    return _out((hu_noisy - low) / (high - low))


def apply_confounder(kind: str, image, *, confounded: bool, seed: int) -> np.ndarray:
    """The data pipeline's one entry point: the image with or without the confounder.

    "tag" and "lowpass" leave clean images as they are (a copy). "poisson" adds noise to every
    image, more of it when confounded, so that noise itself is no shortcut, only its level.
    Deterministic for a seed.
    """
    if kind == "tag":
        return add_tag(image) if confounded else _out(_checked(image))
    if kind == "lowpass":
        return lowpass(image) if confounded else _out(_checked(image))
    if kind == "poisson":
        n0 = POISSON_N0_CONFOUNDED if confounded else POISSON_N0_CLEAN
        return poisson_noise(image, n0, np.random.default_rng(seed))
    raise MedcurateError(f"unknown confounder {kind!r}: choose one of {', '.join(IMAGE_CONFOUNDERS)}")


def _check_common(labels, positive, role: str) -> np.ndarray:
    labels = np.asarray(labels)
    if role not in ROLES:
        raise MedcurateError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    if not np.any(labels == positive):
        raise MedcurateError(f"the positive label {positive!r} does not occur in the labels")
    return labels == positive


def confound_mask(labels, positive, p: float, seed: int, role: str) -> np.ndarray:
    """Which images carry the confounder (a boolean mask over ``labels``).

    "train"/"iid": exactly round(p * #positives) positives, drawn with the seed, and no
    negative, so the confounder predicts the label. "ood": every negative and no positive, the
    reversed correlation that exposes a model relying on the shortcut.
    """
    if not 0.0 <= p <= 1.0:
        raise MedcurateError(f"the confounded share p must be in [0, 1], got {p}")
    is_pos = _check_common(labels, positive, role)
    if role == "ood":
        return ~is_pos
    pos = np.flatnonzero(is_pos)
    chosen = np.random.default_rng(seed).choice(pos, size=round(p * len(pos)), replace=False)
    mask = np.zeros(len(is_pos), dtype=bool)
    mask[chosen] = True
    return mask


def metadata_sample(labels, carrier, positive, level: float, seed: int, role: str) -> np.ndarray:
    """Indices of a resample whose binary attribute (``carrier``, e.g. sex or site) tracks the label.

    "train"/"iid": carriers make up 0.5 + level/2 of the positives and 0.5 - level/2 of the
    negatives (level 0: attribute balanced and independent of the label; 1: fully confounded).
    "ood": reversed, positives all non-carriers, negatives all carriers. Each class keeps
    n = min(#carriers, #non-carriers) of that class, whatever the level and role, so results
    at different levels are comparable; round(n * share) of them are carriers. Drawn without
    replacement with the seed; returned sorted.
    """
    if not 0.0 <= level <= 1.0:
        raise MedcurateError(f"the confounding level must be in [0, 1], got {level}")
    is_pos = _check_common(labels, positive, role)
    carrier = np.asarray(carrier, dtype=bool)
    if carrier.shape != is_pos.shape:
        raise MedcurateError(f"carrier has shape {carrier.shape}, labels {is_pos.shape}")
    rng = np.random.default_rng(seed)
    picked = []
    for name, in_class, share in (("positive", is_pos, 0.5 + level / 2),
                                  ("negative", ~is_pos, 0.5 - level / 2)):
        if role == "ood":
            share = 0.0 if name == "positive" else 1.0
        cells = {"carriers": np.flatnonzero(in_class & carrier),
                 "non-carriers": np.flatnonzero(in_class & ~carrier)}
        for cell, idx in cells.items():
            if len(idx) == 0:
                raise MedcurateError(f"no {name} {cell}: the attribute cannot be confounded "
                                     "with the label in this data")
        n = min(len(idx) for idx in cells.values())
        n_carriers = round(n * share)
        picked.append(rng.choice(cells["carriers"], size=n_carriers, replace=False))
        picked.append(rng.choice(cells["non-carriers"], size=n - n_carriers, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def row_seed(base_seed: int, image_id: str) -> int:
    """A per-image seed, the same in every process (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: fits an int64 column
