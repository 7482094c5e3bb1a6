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
import os
import tarfile
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from medcurate.ingest import dicom
from medcurate.models.preprocess import Preprocessing, normalise, unit_batch
from medcurate.provenance import sha256_bytes
from medcurate.workspace import resolve_filesystem

# The manifest columns decoding reads: where the image is, and (DICOM only) its window.
WINDOW_COLUMNS = ("window_center", "window_width")
IMAGE_COLUMNS = ("uri", "member", *WINDOW_COLUMNS)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Size bombs: what one image or container may hold, checked against what its headers declare
# before anything is read. Each limit is an env var of the processes that read images (the
# ingest job and its Ray workers), read at every check.
MAX_IMAGE_BYTES_ENV = "MEDCURATE_MAX_IMAGE_BYTES"  # one image file or tar member
DEFAULT_MAX_IMAGE_BYTES = 1 << 30
# One .npz member (a split's array), one .tar.gz shard (decompressed), one Parquet image column.
MAX_DECOMPRESSED_ENV = "MEDCURATE_MAX_DECOMPRESSED_BYTES"
DEFAULT_MAX_DECOMPRESSED = 2 << 30
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz")
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


# -- limits -------------------------------------------------------------------------------------
def _limit(env: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(env, default)))
    except ValueError:
        return default


def max_image_bytes() -> int:
    return _limit(MAX_IMAGE_BYTES_ENV, DEFAULT_MAX_IMAGE_BYTES)


def max_decompressed_bytes() -> int:
    return _limit(MAX_DECOMPRESSED_ENV, DEFAULT_MAX_DECOMPRESSED)


def _image_size_ok(size: int, what: str) -> None:
    limit = max_image_bytes()
    if size > limit:
        raise ImageError(f"{what} of {size:,} bytes is over the limit of {limit:,} bytes for "
                         f"one image ({MAX_IMAGE_BYTES_ENV})")


# -- fetching -----------------------------------------------------------------------------------
def read_file_bytes(uri: str) -> bytes:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle:
        _image_size_ok(handle.size(), "a file")
        return handle.read()


# -- .npz: MedMNIST archives, read member by member with their declared sizes checked first ----
def _npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    from numpy.lib import _format_impl  # version 3.0 (utf-8 field names) has no public reader

    return _format_impl._read_array_header(stream, version)


def npz_member_shape(archive: zipfile.ZipFile, name: str) -> tuple[int, ...]:
    """The shape an ``.npz`` member (``name`` without ``.npy``) declares, after checking that
    it can be loaded: its declared uncompressed size and the size its array header implies
    are within ``MEDCURATE_MAX_DECOMPRESSED_BYTES`` and agree, and it holds no objects.
    Nothing but the header is decompressed. Raises ``ImageError`` (or ``KeyError``)."""
    info = archive.getinfo(f"{name}.npy")
    limit = max_decompressed_bytes()
    if info.file_size > limit:
        raise ImageError(f"{name} declares {info.file_size:,} bytes uncompressed, over the "
                         f"limit of {limit:,} bytes for one .npz member ({MAX_DECOMPRESSED_ENV}"
                         "); a possible decompression bomb, not read")
    with archive.open(info) as stream:
        try:
            shape, _, dtype = _npy_header(stream)
        except (ValueError, EOFError) as exc:
            raise ImageError(f"{name} is not a readable array: {exc}") from None
    if dtype.hasobject:
        raise ImageError(f"{name} holds Python objects, which are never unpickled")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limit:
        raise ImageError(f"{name} declares an array of {nbytes:,} bytes, over the limit of "
                         f"{limit:,} bytes for one .npz member ({MAX_DECOMPRESSED_ENV}); not "
                         "read")
    if nbytes > info.file_size:
        raise ImageError(f"{name} declares an array of {nbytes:,} bytes in a member of "
                         f"{info.file_size:,}: truncated or forged, not read")
    return shape


def npz_member(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """One ``.npz`` member as an array, once ``npz_member_shape`` has accepted it (the zip
    reader stops at the declared size, so no more than that is ever decompressed)."""
    npz_member_shape(archive, name)
    with archive.open(f"{name}.npy") as stream:
        try:
            return np.lib.format.read_array(stream, allow_pickle=False)
        except (ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ImageError(f"{name} is not a readable array: {exc}") from None


@lru_cache(maxsize=4)
def _npz_images(uri: str, split: str) -> np.ndarray:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle:
        # On an object store every read is a request: fetch the (compressed) file in one.
        source = handle if isinstance(fs, pafs.LocalFileSystem) else io.BytesIO(handle.read())
        with zipfile.ZipFile(source) as archive:
            return npz_member(archive, f"{split}_images")


# -- tar shards -----------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _tar_index(uri: str) -> dict[str, tuple[int, int]]:
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


class _ShardCache:
    """The file members of the compressed tar shard read last, per process: a ``.tar.gz``
    cannot seek, so it is streamed ONCE and its members kept, instead of streamed up to each
    member in turn (quadratic). Bounded: a member over ``MEDCURATE_MAX_IMAGE_BYTES`` is kept as
    its error, and a shard decompressing past ``MEDCURATE_MAX_DECOMPRESSED_BYTES`` is not read
    further (every member asked for then gets that error, without another pass)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._shards: OrderedDict[str, tuple[dict[str, bytes | str], str | None]] = OrderedDict()
        self.passes = 0  # how many times a shard was streamed (tests count them)

    def member(self, uri: str, name: str) -> bytes:
        with self._lock:
            if uri not in self._shards:
                self._shards[uri] = self._stream(uri)
                while len(self._shards) > 1:
                    self._shards.popitem(last=False)
            members, error = self._shards[uri]
        value = members.get(name)
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            raise ImageError(value)
        if error is not None:
            raise ImageError(error)
        raise KeyError(f"no member {name!r} in the shard")

    def _stream(self, uri: str) -> tuple[dict[str, bytes | str], str | None]:
        self.passes += 1
        fs, path = resolve_filesystem(uri)
        members: dict[str, bytes | str] = {}
        limit = max_decompressed_bytes()
        try:
            with fs.open_input_stream(path) as handle, \
                    tarfile.open(fileobj=handle, mode="r|*") as tar:
                for info in tar:
                    if info.offset_data + info.size > limit:
                        return members, (f"the shard decompresses to over {limit:,} bytes "
                                         f"({MAX_DECOMPRESSED_ENV}); a possible decompression "
                                         "bomb, not read further")
                    if not info.isfile():
                        continue
                    try:
                        _image_size_ok(info.size, "a tar member")
                    except ImageError as exc:
                        members[info.name] = str(exc)
                        continue
                    members[info.name] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            return members, f"unreadable tar shard: {exc}"
        return members, None


_SHARDS = _ShardCache()


def _tar_member_bytes(uri: str, member: str) -> bytes:
    if uri.endswith(COMPRESSED_TAR_SUFFIXES):
        return _SHARDS.member(uri, member)
    offset, size = _tar_index(uri)[member]
    _image_size_ok(size, "a tar member")
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle:
        handle.seek(offset)
        return handle.read(size)


@lru_cache(maxsize=2)
def _parquet_column(uri: str, column: str):
    """One column of a Parquet file of image bytes. Its leaves' uncompressed sizes (a struct's
    bytes and path are two), summed over row groups, must be within
    ``MEDCURATE_MAX_DECOMPRESSED_BYTES``; byte leaves are read as dictionaries, so a small
    dictionary page that thousands of rows point to stays small (decoded, it would not)."""
    fs, path = resolve_filesystem(uri)
    with fs.open_input_file(path) as handle:
        metadata = pq.ParquetFile(handle).metadata
    leaves = [metadata.schema.column(i) for i in range(metadata.num_columns)]
    chosen = [i for i, leaf in enumerate(leaves)
              if leaf.path == column or leaf.path.startswith(f"{column}.")]
    size = sum(metadata.row_group(g).column(i).total_uncompressed_size
               for g in range(metadata.num_row_groups) for i in chosen)
    limit = max_decompressed_bytes()
    if size > limit:
        raise ImageError(f"Parquet column {column!r} decompresses to {size:,} bytes, over the "
                         f"limit of {limit:,} ({MAX_DECOMPRESSED_ENV}); not read")
    binary = [leaves[i].path for i in chosen if leaves[i].physical_type == "BYTE_ARRAY"]
    return pq.read_table(path, filesystem=fs, columns=[column],
                         read_dictionary=binary or None).column(column)


def fetch(uri: str, member: str | None) -> bytes | np.ndarray:
    """The raw payload of one image: encoded bytes, or a pixel array for ``.npz`` members."""
    if member is None:
        return read_file_bytes(uri)
    if uri.endswith(".npz"):
        split, index = member.rsplit("/", 1)
        return _npz_images(uri, split)[int(index)]
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
    except (OSError, KeyError, IndexError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
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


def decode_preprocess(rows: dict, prep: Preprocessing, *, normalised: bool = True) -> np.ndarray:
    """Manifest rows (``IMAGE_COLUMNS``) decoded and preprocessed for a network, in order:
    the one image path of embedding, training, pretraining and scoring, so a model sees an
    image the same way in each. ``normalised=False`` stops at [0, 1] pixels (``unit_batch``),
    for a step that must come before normalisation (a confounder); ``normalise`` finishes."""
    pixels = unit_batch(load_rows(rows), prep)
    return normalise(pixels, prep) if normalised else pixels


def image_columns(table: pa.Table) -> list[str]:
    """The ``IMAGE_COLUMNS`` that ``table`` has (the window only where the images are DICOM)."""
    return [c for c in IMAGE_COLUMNS if c in table.column_names]


def with_image_columns(table: pa.Table) -> pa.Table:
    """``table``'s ``IMAGE_COLUMNS``, the window as nulls where it has none, so tables of
    DICOM and other images concatenate."""
    for column in WINDOW_COLUMNS:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.float64()))
    return table.select(list(IMAGE_COLUMNS))
