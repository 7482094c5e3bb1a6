"""Fetch and decode one image from anything ingest understands.

A manifest row locates its image by ``uri`` (a file, local or object-store) and ``member``
(null for a standalone image or DICOM file; ``<split>/<index>`` inside a MedMNIST ``.npz``; the
member name inside a WebDataset ``.tar``; ``<column>/<row>`` inside a Parquet file of encoded
bytes). The same functions probe images at ingest and decode them for embedding, so what was
validated is exactly what the models later see.
"""

from __future__ import annotations

import io
import math
import tarfile
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from medcurate.ingest import dicom
from medcurate.provenance import sha256_bytes
from medcurate.workspace import resolve_filesystem

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Pillow refuses images above ~179 Mpx as possible decompression bombs; whole-slide images are
# out of scope for this pipeline, so that limit stays and such files are rejected.
_BITS_PER_MODE = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8,
                  "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


class ImageError(ValueError):
    """An image that cannot be used; the message is the reject reason."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int
    bit_depth: int
    sha256: str
    extra: dict  # format-specific columns (DICOM header fields and window)


# -- fetching -----------------------------------------------------------------------------------
def read_file_bytes(uri: str) -> bytes:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle:
        return handle.read()


@lru_cache(maxsize=4)
def _npz_arrays(uri: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle, np.load(io.BytesIO(handle.read())) as archive:
        return archive[f"{split}_images"], archive[f"{split}_labels"]


@lru_cache(maxsize=8)
def _tar_index(uri: str) -> dict[str, tuple[int, int]]:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def _tar_member_bytes(uri: str, member: str) -> bytes:
    if uri.endswith((".gz", ".tgz")):  # compressed tars cannot seek: stream through it once
        fs, path = resolve_filesystem(uri)
        with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
            return tar.extractfile(member).read()
    offset, size = _tar_index(uri)[member]
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle:
        handle.seek(offset)
        return handle.read(size)


@lru_cache(maxsize=2)
def _parquet_column(uri: str, column: str):
    fs, path = resolve_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=[column]).column(column)


def fetch(uri: str, member: str | None) -> bytes | np.ndarray:
    """The raw payload of one image: encoded bytes, or a pixel array for ``.npz`` members."""
    if member is None:
        return read_file_bytes(uri)
    if uri.endswith(".npz"):
        split, index = member.rsplit("/", 1)
        return _npz_arrays(uri, split)[0][int(index)]
    if uri.endswith(TAR_SUFFIXES):
        return _tar_member_bytes(uri, member)
    if uri.endswith(".parquet"):
        column, row = member.rsplit("/", 1)
        value = _parquet_column(uri, column)[int(row)].as_py()
        if isinstance(value, dict):  # e.g. Hugging Face's {"bytes": ..., "path": ...} struct
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise ImageError(f"Parquet cell {member} holds no image bytes")
        return bytes(value)
    raise ImageError(f"cannot locate member {member!r} in {uri}: unknown container type")


def is_dicom(name: str, data: bytes) -> bool:
    return name.lower().endswith(DICOM_SUFFIXES) or data[128:132] == b"DICM"


# -- decoding -----------------------------------------------------------------------------------
def _open_pil(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # full decode: truncated files fail here, not later in a model
    except UnidentifiedImageError:
        raise ImageError("not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageError(f"unreadable or truncated image: {exc}") from None
    return image


def _check_shape(height: int, width: int, channels: int, min_side: int) -> None:
    if channels not in (1, 3, 4):
        raise ImageError(f"unsupported shape: {channels} channels (need 1, 3 or 4)")
    if min(height, width) < min_side:
        raise ImageError(f"unsupported shape: {height}x{width} is smaller than {min_side} px")


def _array_shape(array: np.ndarray) -> tuple[int, int, int]:
    if array.ndim == 2:
        return array.shape[0], array.shape[1], 1
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        return array.shape[0], array.shape[1], array.shape[2]
    raise ImageError(f"unsupported shape: array of shape {tuple(array.shape)} is not a 2-D image")


def probe(uri: str, member: str | None, window: tuple[float, float] | None = None,
          min_side: int = 8) -> ImageInfo:
    """Fetch, fully decode and describe one image; raises ImageError with the reject reason."""
    try:
        payload = fetch(uri, member)
    except ImageError:
        raise
    except (OSError, KeyError, IndexError, tarfile.TarError) as exc:
        raise ImageError(f"cannot read: {exc}") from None
    if isinstance(payload, np.ndarray):
        height, width, channels = _array_shape(payload)
        _check_shape(height, width, channels, min_side)
        digest = sha256_bytes(str(payload.shape).encode() + payload.tobytes())
        return ImageInfo(width, height, channels, payload.dtype.itemsize * 8, digest, {})
    digest = sha256_bytes(payload)
    if is_dicom(member or uri, payload):
        try:
            ds = dicom.read_dataset(payload)
            dicom.modality_values(ds)  # decode now so broken pixel data is rejected at ingest
        except dicom.DicomError as exc:
            raise ImageError(str(exc)) from None
        height, width = int(ds.Rows), int(ds.Columns)
        channels = int(getattr(ds, "SamplesPerPixel", 1))
        _check_shape(height, width, channels, min_side)
        chosen = window or dicom.own_window(ds)
        extra = dicom.header_metadata(ds)
        extra["window_center"], extra["window_width"] = chosen if chosen else (None, None)
        return ImageInfo(width, height, channels, int(getattr(ds, "BitsStored", 16)), digest, extra)
    image = _open_pil(payload)
    channels = len(image.getbands())
    _check_shape(image.height, image.width, channels, min_side)
    return ImageInfo(image.width, image.height, channels, _BITS_PER_MODE.get(image.mode, 8),
                     digest, {})


def _pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image, dtype=np.uint16)
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        return (values - low) / ((high - low) or 1.0)
    if image.mode in ("1", "LA"):
        image = image.convert("L")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return np.asarray(image)


def load_image(uri: str, member: str | None = None, window_center: float | None = None,
               window_width: float | None = None) -> np.ndarray:
    """Decode an image for a model: uint8/uint16 pixels, or float32 in [0, 1] (DICOM, float).

    Shapes are (H, W) for grey and (H, W, 3) for colour; DICOM arrives windowed as at ingest.
    """
    payload = fetch(uri, member)
    if isinstance(payload, np.ndarray):
        return payload[..., 0] if payload.ndim == 3 and payload.shape[2] == 1 else payload
    if is_dicom(member or uri, payload):
        window = None if window_center is None else (window_center, window_width)
        return dicom.dicom_to_image(dicom.read_dataset(payload), window)
    return _pil_to_array(_open_pil(payload))


def _window(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def load_rows(rows: dict) -> list[np.ndarray]:
    """Decode manifest rows (columns ``uri``, ``member`` and, for DICOM, the window) in order:
    the one way every stage that trains or scores on a collection reads its images."""
    uris = list(rows["uri"])
    centres = rows.get("window_center")
    widths = rows.get("window_width")
    centres = [None] * len(uris) if centres is None else list(centres)
    widths = [None] * len(uris) if widths is None else list(widths)
    return [load_image(uri, member, _window(c), _window(w))
            for uri, member, c, w in zip(uris, rows["member"], centres, widths)]
