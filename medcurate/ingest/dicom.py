"""DICOM pixel handling: Hounsfield units, windowing, MONOCHROME1, confounder header fields."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from medcurate.errors import MedcurateError

# Header fields that commonly act as confounders; each becomes a metadata column.
CONFOUNDER_FIELDS = (
    "PatientSex",
    "PatientAge",
    "Manufacturer",
    "InstitutionName",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
)


class DicomError(ValueError):
    """A DICOM file that cannot become an image; the message is the reject reason."""


def read_dataset(data: bytes) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as exc:
        raise DicomError(f"not a DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on truncated/garbled input
        raise DicomError(f"unreadable DICOM: {exc}") from exc
    if "PixelData" not in ds:
        raise DicomError("DICOM has no pixel data")
    check_pixel_count(ds)
    return ds


def _header_int(ds: pydicom.Dataset, name: str, default: int) -> int:
    value = getattr(ds, name, None)
    try:
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise DicomError(f"DICOM {name} is not a number: {value!r}") from None


def check_pixel_count(ds: pydicom.Dataset) -> None:
    """Refuse pixel data whose header declares more pixels (rows x columns x frames) than
    Pillow's ``Image.MAX_IMAGE_PIXELS``, the limit PNG and JPEG files get, before any of it is
    decoded: compressed pixel data (JPEG 2000, RLE) decodes to whatever the header says."""
    rows, columns = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
    frames = _header_int(ds, "NumberOfFrames", 1)
    if min(rows, columns, frames) < 1:
        raise DicomError(f"DICOM declares {rows}x{columns} pixels in {frames} frame(s): no image")
    pixels, limit = rows * columns * frames, Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > limit:
        raise DicomError(f"DICOM declares {pixels:,} pixels ({rows}x{columns} x {frames} "
                         f"frames), over the limit of {int(limit):,} (Pillow's "
                         "MAX_IMAGE_PIXELS); a possible decompression bomb, not decoded")


def modality_values(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values mapped through rescale slope/intercept (Hounsfield units for CT)."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomError(f"cannot decode DICOM pixel data: {exc}") from exc
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * slope + intercept


def header_metadata(ds: pydicom.Dataset) -> dict[str, str | None]:
    values = {}
    for field in CONFOUNDER_FIELDS:
        value = getattr(ds, field, None)
        values[field] = None if value in (None, "") else str(value)
    return values


def own_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The file's first (WindowCenter, WindowWidth), where it declares one."""
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
    return first(center), first(width)


def parse_window(text: str | None) -> tuple[float, float] | None:
    """Parse ``--window CENTER,WIDTH`` (e.g. ``40,400`` for a CT soft-tissue window)."""
    if text is None or text == "":
        return None
    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise MedcurateError(f"--window must be CENTER,WIDTH (e.g. 40,400), got {text!r}") from None
    if width <= 0:
        raise MedcurateError(f"--window width must be positive, got {width}")
    return center, width


def apply_window(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Map modality values to [0, 1]: a linear window, or the image's own range without one."""
    if window is None:
        low, high = float(values.min()), float(values.max())
    else:
        center, width = window
        low, high = center - width / 2.0, center + width / 2.0
    scale = (high - low) or 1.0
    return np.clip((values - low) / scale, 0.0, 1.0).astype(np.float32)


def dicom_to_image(ds: pydicom.Dataset, window: tuple[float, float] | None) -> np.ndarray:
    """A display image in [0, 1]: windowed, MONOCHROME1 inverted so bright means dense."""
    image = apply_window(modality_values(ds), window)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 1.0 - image
    return image
