"""Synthetic confounders: tag, low-pass, Poisson noise, masks and metadata resampling."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medcurate.confounders import (
    IMAGE_CONFOUNDERS,
    POISSON_N0_CLEAN,
    POISSON_N0_CONFOUNDED,
    _lowpass_unclipped,
    add_tag,
    apply_confounder,
    confound_mask,
    lowpass,
    metadata_sample,
    poisson_noise,
    row_seed,
    tag_box,
)
from medcurate.errors import MedcurateError

R_AT_7PX = np.array([
    [1, 1, 1, 1, 0],
    [1, 0, 0, 0, 1],
    [1, 0, 0, 0, 1],
    [1, 1, 1, 1, 0],
    [1, 0, 1, 0, 0],
    [1, 0, 0, 1, 0],
    [1, 0, 0, 0, 1],
], dtype=bool)


def textured(size: int, channels: int | None = None, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus pixel noise, kept inside [0.1, 0.7] so nothing starts white."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (size, size, channels)
    ramp = np.linspace(0.2, 0.5, size)[:, None] * np.ones((1, size))
    if channels is not None:
        ramp = ramp[..., None]
    return (ramp + rng.uniform(-0.1, 0.2, size=shape)).astype(np.float32)


def high_freq_energy(image: np.ndarray) -> float:
    """Spectral energy beyond a quarter of the sampling rate (outside the lowpass disk)."""
    size = image.shape[0]
    spectrum = np.fft.fftshift(np.fft.fft2(image - image.mean()))
    yy, xx = np.mgrid[:size, :size] - size // 2
    return float(np.sum(np.abs(spectrum[yy ** 2 + xx ** 2 > (size / 4) ** 2]) ** 2))


def test_kinds():
    assert IMAGE_CONFOUNDERS == ("tag", "lowpass", "poisson")
    assert POISSON_N0_CLEAN == 2e7 and POISSON_N0_CONFOUNDED == 1.5e7


def test_tag_box_scales_with_the_image():
    assert tag_box(1024) == (200, 200, 64, 46)  # the paper's 64 px R at (200, 200)
    assert tag_box(224) == (44, 44, 14, 10)
    assert tag_box(64) == (12, 12, 7, 5)  # 4 px would be no R: at least the 5 x 7 glyph
    with pytest.raises(MedcurateError, match="too small"):
        tag_box(8)


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("channels", [None, 3])
def test_tag_changes_only_the_box_and_whitens_it(size, channels):
    image = textured(size, channels)
    before = image.copy()
    out = add_tag(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_array_equal(image, before)  # input untouched
    top, left, height, width = tag_box(size)
    inside = np.zeros(image.shape[:2], dtype=bool)
    inside[top:top + height, left:left + width] = True
    np.testing.assert_array_equal(out[~inside], image[~inside])
    white = np.all(out == 1.0, axis=-1) if channels else out == 1.0
    assert white[inside].sum() >= 0.4 * height * width
    assert not white[~inside].any()
    assert (out[inside] != image[inside]).any()


def test_tag_is_an_r_at_small_sizes():
    out = add_tag(np.zeros((64, 64), np.float32))
    top, left, height, width = tag_box(64)
    np.testing.assert_array_equal(out[top:top + height, left:left + width] == 1.0, R_AT_7PX)
    assert out.sum() == R_AT_7PX.sum()


@pytest.mark.parametrize("channels", [None, 3])
def test_lowpass_keeps_the_mean_and_drops_high_frequencies(channels):
    image = textured(64, channels, seed=1)
    before = image.copy()
    as64 = image.astype(np.float64)
    np.testing.assert_allclose(_lowpass_unclipped(as64).mean(), as64.mean(), rtol=1e-12)
    out = lowpass(image)
    np.testing.assert_array_equal(image, before)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert abs(out.mean() - image.mean()) < 0.005
    planes = [out] if channels is None else [out[..., c] for c in range(3)]
    originals = [image] if channels is None else [image[..., c] for c in range(3)]
    for filtered, original in zip(planes, originals):
        assert high_freq_energy(filtered) < 0.01 * high_freq_energy(original)
    assert np.abs(out - image).mean() > 0.02  # it did change the image


def test_poisson_noise_level_follows_the_photon_count():
    grey = np.full((256, 256), 0.5, np.float32)
    clean = poisson_noise(grey, POISSON_N0_CLEAN, np.random.default_rng(0))
    noisy = poisson_noise(grey, POISSON_N0_CONFOUNDED, np.random.default_rng(0))
    np.testing.assert_array_equal(grey, 0.5)
    for out in (clean, noisy):
        assert out.dtype == np.float32 and out.shape == grey.shape
        assert abs(out.mean() - 0.5) < 0.001
    # theory for x = 0.5 (HU -200): sd of mu = 1/sqrt(N0 exp(-mu)), of x = sd(mu) / 0.035,
    # plus 1/255/sqrt(12) dequantisation: ~0.0071 at 2e7, ~0.0082 at 1.5e7
    mu = 0.1837 - 200 * (0.1837 - 0.1662) / 1000
    for out, n0 in ((clean, POISSON_N0_CLEAN), (noisy, POISSON_N0_CONFOUNDED)):
        expected = np.sqrt(1 / (n0 * np.exp(-mu)) / 0.035 ** 2 + (1 / 255) ** 2 / 12)
        assert abs(out.std() - expected) < 0.05 * expected
    assert noisy.var() > 1.2 * clean.var()  # 4/3 expected; estimate error ~1 %


def test_apply_confounder_poisson_noisier_when_confounded():
    grey = np.full((256, 256), 0.3, np.float32)
    clean = apply_confounder("poisson", grey, confounded=False, seed=1)
    noisy = apply_confounder("poisson", grey, confounded=True, seed=1)
    assert noisy.var() > 1.2 * clean.var() > 0


def test_poisson_rejects_a_bad_photon_count():
    with pytest.raises(MedcurateError, match="n0"):
        poisson_noise(np.zeros((8, 8)), 0, np.random.default_rng(0))


@pytest.mark.parametrize("kind", IMAGE_CONFOUNDERS)
def test_apply_confounder_is_deterministic(kind):
    image = textured(64, 3, seed=2)
    before = image.copy()
    a = apply_confounder(kind, image, confounded=True, seed=5)
    b = apply_confounder(kind, image, confounded=True, seed=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(image, before)
    assert not np.array_equal(a, image)
    clean = apply_confounder(kind, image, confounded=False, seed=5)
    assert clean.dtype == np.float32 and clean is not image
    if kind == "poisson":
        other = apply_confounder(kind, image, confounded=True, seed=6)
        assert not np.array_equal(a, other)
        assert not np.array_equal(clean, image)  # clean images are noisy too, only less
    else:
        np.testing.assert_array_equal(clean, image)


def test_apply_confounder_rejects_unknown_kinds():
    with pytest.raises(MedcurateError, match="tag, lowpass, poisson"):
        apply_confounder("blur", np.zeros((64, 64)), confounded=True, seed=0)
    with pytest.raises(MedcurateError, match="square"):
        apply_confounder("tag", np.zeros((64, 32)), confounded=True, seed=0)


LABELS = np.array([1] * 50 + [0] * 70)
np.random.default_rng(3).shuffle(LABELS)


@pytest.mark.parametrize("role", ["train", "iid"])
def test_confound_mask_train_marks_an_exact_share_of_positives(role):
    for p, expected in ((0.0, 0), (0.3, 15), (0.39, 20), (0.9, 45), (1.0, 50)):
        mask = confound_mask(LABELS, 1, p, seed=7, role=role)
        assert mask.dtype == bool and mask.shape == LABELS.shape
        assert mask.sum() == expected
        assert np.all(LABELS[mask] == 1)
    a = confound_mask(LABELS, 1, 0.3, seed=7, role=role)
    np.testing.assert_array_equal(a, confound_mask(LABELS, 1, 0.3, seed=7, role=role))
    assert not np.array_equal(a, confound_mask(LABELS, 1, 0.3, seed=8, role=role))


def test_confound_mask_ood_reverses_the_correlation():
    mask = confound_mask(LABELS, 1, 0.3, seed=7, role="ood")
    np.testing.assert_array_equal(mask, LABELS != 1)


def test_confound_mask_validates():
    for p in (-0.1, 1.1):
        with pytest.raises(MedcurateError, match=r"\[0, 1\]"):
            confound_mask(LABELS, 1, p, seed=0, role="train")
    with pytest.raises(MedcurateError, match="ood"):
        confound_mask(LABELS, 1, 0.5, seed=0, role="test")
    with pytest.raises(MedcurateError, match="does not occur"):
        confound_mask(LABELS, 2, 0.5, seed=0, role="train")


def metadata_data():
    """Positives: 60 carriers, 40 not (n = 40); negatives: 48 carriers, 80 not (n = 48)."""
    labels = np.array(["pneumonia"] * 100 + ["normal"] * 128)
    carrier = np.array([True] * 60 + [False] * 40 + [True] * 48 + [False] * 80)
    order = np.random.default_rng(4).permutation(len(labels))
    return labels[order], carrier[order]


@pytest.mark.parametrize("level, pos_carriers, neg_carriers",
                         [(0.0, 20, 24), (0.5, 30, 12), (1.0, 40, 0)])
def test_metadata_sample_shares(level, pos_carriers, neg_carriers):
    labels, carrier = metadata_data()
    for role in ("train", "iid"):
        idx = metadata_sample(labels, carrier, "pneumonia", level, seed=1, role=role)
        assert idx.dtype == np.int64 and len(np.unique(idx)) == len(idx) == 40 + 48
        pos = labels[idx] == "pneumonia"
        assert pos.sum() == 40
        assert carrier[idx][pos].sum() == pos_carriers
        assert carrier[idx][~pos].sum() == neg_carriers
    again = metadata_sample(labels, carrier, "pneumonia", level, seed=1, role="train")
    np.testing.assert_array_equal(idx, again)


def test_metadata_sample_ood_is_reversed():
    labels, carrier = metadata_data()
    idx = metadata_sample(labels, carrier, "pneumonia", 0.5, seed=1, role="ood")
    pos = labels[idx] == "pneumonia"
    assert pos.sum() == 40 and (~pos).sum() == 48
    assert not carrier[idx][pos].any()
    assert carrier[idx][~pos].all()


def test_metadata_sample_errors():
    labels, carrier = metadata_data()
    with pytest.raises(MedcurateError, match="no negative carriers"):
        metadata_sample(labels, carrier & (labels == "pneumonia"), "pneumonia", 0.5, 0, "train")
    with pytest.raises(MedcurateError, match=r"\[0, 1\]"):
        metadata_sample(labels, carrier, "pneumonia", 1.5, 0, "train")
    with pytest.raises(MedcurateError, match="shape"):
        metadata_sample(labels, carrier[:-1], "pneumonia", 0.5, 0, "train")
    with pytest.raises(MedcurateError, match="does not occur"):
        metadata_sample(labels, carrier, "covid", 0.5, 0, "train")


def test_row_seed_is_stable_across_processes():
    seed = row_seed(42, "img_001.png")
    digest = hashlib.sha256(b"42:img_001.png").digest()
    assert seed == int.from_bytes(digest[:8], "big") >> 1
    assert 0 <= seed < 2 ** 63
    assert seed != row_seed(42, "img_002.png") and seed != row_seed(43, "img_001.png")
    code = "from medcurate.confounders import row_seed; print(row_seed(42, 'img_001.png'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, check=True)
    assert int(other.stdout) == seed


def test_confounders_on_real_pneumoniamnist(shared_data):
    data = np.load(shared_data / "pneumoniamnist" / "pneumoniamnist.npz")
    images = data["train_images"][:4]
    for i, raw in enumerate(images):
        image = np.asarray(Image.fromarray(raw).resize((64, 64), Image.BILINEAR),
                           np.float32) / 255.0
        for kind in IMAGE_CONFOUNDERS:
            out = apply_confounder(kind, image, confounded=True, seed=i)
            assert out.shape == (64, 64) and out.dtype == np.float32
            assert 0.0 <= out.min() and out.max() <= 1.0
            assert not np.array_equal(out, image)
            assert abs(out.mean() - image.mean()) < 0.05
