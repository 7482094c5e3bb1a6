"""A built-in, synthetic demo archive that can be made offline in seconds.

It is NOT medical data: three classes of simple shapes on a noisy background, each class with
a hidden sub-group (about 10%) acquired at a second "site" that burns a bright tag into the
corner and images brighter. It exists so ``make demo`` shows the whole pipeline, including a
confounder a plain random draw tends to miss, on any machine.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_CLASSES = ("disc", "ring", "bar")
DEMO_NOTICE = "SYNTHETIC DEMO DATA (not medical images): shapes with a planted site confounder"


def _shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.15, 0.25) * size
    dist = np.hypot(yy - cy, xx - cx)
    if kind == "disc":
        return (dist < radius).astype(np.float32)
    if kind == "ring":
        return ((dist < radius) & (dist > radius * 0.6)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return ((np.abs(along) < radius * 1.4) & (np.abs(across) < radius * 0.3)).astype(np.float32)


def make_demo_archive(root: str | Path, per_class: int = 100, size: int = 64,
                      rare_fraction: float = 0.1, seed: int = 0) -> Path:
    """Write ``root/<class>/*.png`` and ``root/metadata.csv`` (file, label, site)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for kind in DEMO_CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        rare = max(1, round(per_class * rare_fraction))
        for index in range(per_class):
            site = "site_b" if index < rare else "site_a"
            background = 0.35 if site == "site_b" else 0.15
            image = background + 0.5 * _shape(kind, size, rng)
            image += rng.normal(0, 0.05, (size, size))
            if site == "site_b":  # burned-in tag in the top-left corner
                tag = size // 6
                image[2:2 + tag, 2:2 + tag] = 1.0
            pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
            name = f"{kind}_{index:04d}.png"
            Image.fromarray(pixels, mode="L").save(root / kind / name)
            rows.append({"file": name, "label": kind, "site": site})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "site"])
        writer.writeheader()
        writer.writerows(rows)
    return root
