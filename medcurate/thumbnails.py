"""Small JPEG thumbnails of a collection's own images, as data URIs a report can inline.

Each image is decoded by ``medcurate.ingest.decode``, the path every stage reads images
through, so a thumbnail shows what the models saw (DICOM windowed as at ingest).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from medcurate.ingest.decode import image_columns, load_rows


def thumbnail_uris(rows: pa.Table, size: int = 64, quality: int = 70) -> list[str | None]:
    """One ``data:image/jpeg;base64,...`` URI per manifest row (columns ``uri``, ``member``,
    optionally ``window_center``, ``window_width``), at most ``size`` px on its longest side.
    A row that cannot be read or decoded gives None: a report shows every other image."""
    return [_thumbnail(row, size, quality)
            for row in rows.select(image_columns(rows)).to_pylist()]


def _thumbnail(row: dict, size: int, quality: int) -> str | None:
    try:
        pixels = load_rows({key: [value] for key, value in row.items()})[0]
    except Exception:  # noqa: BLE001 - display only: one unreadable image blanks its thumbnail
        return None
    image = Image.fromarray(display_pixels(pixels))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def display_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 grey (H, W) or RGB (H, W, 3) for display: uint8 as it is, floats in [0, 1] scaled
    to 0..255, anything else (uint16, other ranges) stretched from its own minimum to maximum,
    since a 12-bit image in a 16-bit range would otherwise show black."""
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[..., :3]
    elif pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if not (np.issubdtype(pixels.dtype, np.floating) and 0.0 <= low and high <= 1.0):
        values = (values - low) / ((high - low) or 1.0)
    return np.round(values * 255).astype(np.uint8)
