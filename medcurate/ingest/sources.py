"""Readers: turn an archive into a listing of images to probe, before any pixel is read.

A listing is a table with ``uri``, ``member``, ``relpath`` (the image's place inside the
source, which makes ids stable across machines), ``label``, ``split`` and every metadata column
the source has, plus the rejects found while listing (e.g. an image with no label).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from medcurate.confine import OUTSIDE, PathRefused, Roots, is_uri, realpath
from medcurate.config import IngestConfig
from medcurate.errors import MedcurateError
from medcurate.ingest.decode import (COMPRESSED_TAR_SUFFIXES, DICOM_SUFFIXES,
                                     MAX_DECOMPRESSED_ENV, TAR_SUFFIXES, ImageError,
                                     max_decompressed_bytes, npz_member, npz_member_shape)
from medcurate.provenance import InputRef, sha256_bytes
from medcurate.workspace import file_sha256, resolve_filesystem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm",
                  ".ppm") + DICOM_SUFFIXES
SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "val": "val", "valid": "val", "validation": "val"}
CORE_COLUMNS = ("id", "uri", "member", "relpath", "label", "split", "width", "height",
                "channels", "bit_depth", "sha256", "duplicate_of")
WEBDATASET_TEXT_BYTES = 1 << 20  # largest .json / .cls member read while listing


@dataclass
class Listing:
    format: str
    items: pa.Table
    rejects: list[dict] = field(default_factory=list)
    inputs: list[InputRef] = field(default_factory=list)


def split_name(text: str | None) -> str | None:
    return SPLIT_NAMES.get(text.lower()) if text else None


def split_of_file(name: str) -> str | None:
    """The split a shard's file name starts with: ``train.parquet``, ``train-00000-of-00004
    .parquet`` and ``val-000000.tar`` all name theirs. One rule for every sharded reader
    (the Parquet reader used to cut only at '-', so ``train.parquet`` got no split)."""
    return split_name(posixpath.basename(name).split("-")[0].split(".")[0])


def _join_uri(root: str, relpath: str) -> str:
    """``root/relpath``, keeping a query (``?endpoint_override=…``) of the root at the end."""
    base, query = root.split("?", 1) if "?" in root else (root, "")
    joined = f"{base.rstrip('/')}/{relpath}" if relpath else base
    return f"{joined}?{query}" if query else joined


class _Source:
    """The source as pyarrow.fs sees it; URIs written to the manifest keep the user's scheme.

    Confined (``roots`` given, see ``IngestConfig.confine_to``), a local folder is walked
    here instead of by pyarrow: a symlink is followed only where it resolves inside the roots
    (a folder once, so loops end), each file is read at its resolved path, and every link out
    of the roots is one reject that names the link, never its target."""

    def __init__(self, uri: str, roots: Roots | None = None):
        self.uri, self.roots = uri, roots
        self.fs, self.path = resolve_filesystem(uri)
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise MedcurateError(f"source {uri} does not exist")
        self.is_dir = info.type == pafs.FileType.Directory
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        # Local sources are written as absolute paths; remote ones keep their scheme.
        self.base = self.path if self.is_local else uri.rstrip("/")
        self.rejects: list[dict] = []  # links out of the roots, found while listing
        self._files: list[str] | None = None
        self._real: dict[str, str] = {}  # confined local folder: relative path -> resolved

    def files(self) -> list[str]:
        """Relative paths of every non-hidden file below a folder source, sorted."""
        if not self.is_dir:
            return [""]
        if self._files is None:
            self._files = (self._walk_confined() if self.roots and self.is_local
                           else self._listed())
        return self._files

    def _listed(self) -> list[str]:
        selector = pafs.FileSelector(self.path, recursive=True)
        prefix = self.path.rstrip("/") + "/"
        rels = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.base_name
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if self.roots and any(part in ("", ".", "..") for part in rel.split("/")):
                self._refuse(rel, OUTSIDE)  # an object key that would read as a path out
                continue
            rels.append(rel)
        return sorted(rels)

    def _walk_confined(self) -> list[str]:
        rels: list[str] = []
        visited: set[str] = set()

        def visit(folder: str, prefix: str) -> None:
            if folder in visited:
                return
            visited.add(folder)
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError:
                return
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = prefix + entry.name
                real = realpath(entry.path) if entry.is_symlink() else entry.path
                if not self.roots.contains(real):
                    self._refuse(rel, OUTSIDE)
                    continue
                try:
                    mode = os.stat(real).st_mode
                except OSError:  # a dangling link inside the roots: nothing to read
                    continue
                if stat.S_ISDIR(mode):
                    visit(real, rel + "/")
                elif stat.S_ISREG(mode):
                    rels.append(rel)
                    self._real[rel] = real

        visit(realpath(self.path), "")
        return sorted(rels)

    def _refuse(self, rel: str, reason: str) -> None:
        self.rejects.append({"uri": _join_uri(self.base, rel), "member": None,
                             "reason": reason})

    def uri_of(self, rel: str) -> str:
        return self._real.get(rel) or _join_uri(self.base, rel)

    def path_of(self, rel: str) -> str:
        """Where the filesystem reads ``rel`` (the resolved path, where confined)."""
        return self._real.get(rel) or _join_uri(self.path, rel)

    def read_bytes(self, rel: str = "") -> bytes:
        with self.fs.open_input_file(self.path_of(rel)) as handle:
            return handle.read()


# -- tables -------------------------------------------------------------------------------------
def read_table(uri: str) -> tuple[pa.Table, InputRef]:
    """Read a CSV/TSV/Parquet table; returns it and its provenance reference."""
    fs, path = resolve_filesystem(uri)
    try:
        with fs.open_input_file(path) as handle:
            data = handle.read()
    except (FileNotFoundError, OSError) as exc:
        raise MedcurateError(f"cannot read table {uri}: {exc}") from None
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            delimiter = "\t" if path.endswith(".tsv") else ","
            table = pacsv.read_csv(io.BytesIO(data),
                                   parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except pa.ArrowInvalid as exc:
        raise MedcurateError(f"cannot parse table {uri}: {exc}") from None
    return table, InputRef(role="metadata", uri=uri, sha256=sha256_bytes(data))


def _require_column(table: pa.Table, column: str, flag: str, where: str) -> None:
    if column not in table.column_names:
        raise MedcurateError(f"{where} has no column {column!r} (pass {flag}); "
                             f"columns: {', '.join(table.column_names)}")


def _as_strings(column: pa.ChunkedArray) -> list[str | None]:
    values = pc.cast(column, pa.string()).to_pylist()
    return [None if v is None or v.strip() == "" else v.strip() for v in values]


def _metadata_columns(table: pa.Table, consumed: set[str]) -> pa.Table:
    """Every column not consumed as path/id/label/split, renamed away from core columns."""
    keep = [c for c in table.column_names if c not in consumed]
    renamed = [f"meta_{c}" if c in CORE_COLUMNS else c for c in keep]
    return table.select(keep).rename_columns(renamed)


def _items_table(rows: dict[str, list], metadata: pa.Table | None = None) -> pa.Table:
    table = pa.table({
        "uri": pa.array(rows["uri"], pa.string()),
        "member": pa.array(rows["member"], pa.string()),
        "relpath": pa.array(rows["relpath"], pa.string()),
        "label": pa.array(rows["label"], pa.string()),
        "split": pa.array(rows["split"], pa.string()),
    })
    if metadata is not None:
        for name in metadata.column_names:
            table = table.append_column(name, metadata.column(name))
    return table


def _empty_rows() -> dict[str, list]:
    return {k: [] for k in ("uri", "member", "relpath", "label", "split")}


def _label_problem(label: str | None, config: IngestConfig, why: str) -> str | None:
    return None if label is not None or config.unlabeled else f"no label: {why}"


# -- folder (and DICOM folder) ------------------------------------------------------------------
def _folder_label_split(rel: str) -> tuple[str | None, str | None]:
    parts = rel.split("/")
    split = split_name(parts[0]) if len(parts) > 1 else None
    parent = parts[-2] if len(parts) > 1 else None
    label = None if parent is None or split_name(parent) else parent
    return label, split


def list_folder(config: IngestConfig, source: _Source, fmt: str) -> Listing:
    files = source.files()
    listing = Listing(format=fmt, items=pa.table({}))
    metadata_file = None
    lookup, meta_table, meta_split = None, None, None
    if config.metadata:
        table, ref = read_table(config.metadata)
        listing.inputs.append(ref)
        metadata_file = posixpath.basename(resolve_filesystem(config.metadata)[1])
        if not config.id_column:
            raise MedcurateError("--metadata needs --id-column: the column holding file names")
        _require_column(table, config.id_column, "--id-column", config.metadata)
        label_column = config.label_column or "label"
        if not config.unlabeled:
            _require_column(table, label_column, "--label-column", config.metadata)
        keys = _as_strings(table.column(config.id_column))
        lookup = {}
        for index, key in enumerate(keys):
            if key is not None:
                lookup.setdefault(key, index)
                lookup.setdefault(posixpath.splitext(key)[0], index)
        labels = (_as_strings(table.column(label_column))
                  if label_column in table.column_names else [None] * len(keys))
        if config.split_column:
            _require_column(table, config.split_column, "--split-column", config.metadata)
            meta_split = _as_strings(table.column(config.split_column))
        consumed = {config.id_column, label_column, config.split_column}
        meta_table = _metadata_columns(table, consumed)
    rows, matched = _empty_rows(), []
    for rel in files:
        if metadata_file and posixpath.basename(rel) == metadata_file:
            continue
        uri = source.uri_of(rel)
        label, split = _folder_label_split(rel)
        if lookup is not None:
            name = posixpath.basename(rel)
            index = lookup.get(name, lookup.get(posixpath.splitext(name)[0]))
            if index is None:
                listing.rejects.append({"uri": uri, "member": None,
                                        "reason": f"no label: {name} is not in {config.metadata}"})
                continue
            label = labels[index]
            split = split_name(meta_split[index]) or meta_split[index] if meta_split else split
            matched.append(index)
        problem = _label_problem(label, config, "no class sub-folder and no --metadata row")
        if problem:
            listing.rejects.append({"uri": uri, "member": None, "reason": problem})
            continue
        for key, value in zip(("uri", "member", "relpath", "label", "split"),
                              (uri, None, rel, label, split)):
            rows[key].append(value)
    metadata = meta_table.take(pa.array(matched, pa.int64())) if meta_table is not None else None
    if lookup is not None:
        unused = sorted(set(range(meta_table.num_rows)) - set(matched))
        for index in unused:
            listing.rejects.append({"uri": f"{config.metadata}#{keys[index]}", "member": None,
                                    "reason": "listed in metadata, no image file found"})
    listing.items = _items_table(rows, metadata)
    return listing


# -- CSV/Parquet manifest of paths ---------------------------------------------------------------
def _manifest_entry(roots: Roots, candidate: str) -> tuple[str | None, str | None]:
    """``(resolved uri, None)`` for a path a manifest lists, if it lies inside the roots and is
    a file (or does not exist: the probe says so); else ``(None, reason)``. The reason never
    names the path or what lies there."""
    try:
        resolved = roots.resolve(candidate)
    except PathRefused as exc:
        return None, str(exc)
    if not is_uri(resolved):
        try:
            mode = os.stat(resolved).st_mode
        except OSError:
            return resolved, None
        if not stat.S_ISREG(mode):
            return None, "not a regular file"
    return resolved, None


def list_path_table(config: IngestConfig, source: _Source, table: pa.Table, ref: InputRef,
                    fmt: str) -> Listing:
    """Confined (``source.roots``), every listed path (absolute, relative, ``..``, a URI) must
    resolve inside the roots, and the resolved path is what the manifest keeps; a path that
    does not is a reject of its row (``TABLE#rowN``) saying why, without the path."""
    where = source.uri
    _require_column(table, config.path_column, "--path-column", where)
    label_column = config.label_column or "label"
    if not config.unlabeled:
        _require_column(table, label_column, "--label-column", where)
    base_dir = posixpath.dirname(source.base)
    if source.roots and not source.is_local:
        base_dir = posixpath.dirname(source.base.partition("?")[0])  # the roots add queries
    paths = _as_strings(table.column(config.path_column))
    labels = (_as_strings(table.column(label_column)) if label_column in table.column_names
              else [None] * len(paths))
    splits = [None] * len(paths)
    if config.split_column:
        _require_column(table, config.split_column, "--split-column", where)
        splits = [split_name(s) or s for s in _as_strings(table.column(config.split_column))]
    metadata = _metadata_columns(table, {config.path_column, label_column, config.split_column})
    listing = Listing(format=fmt, items=pa.table({}), inputs=[ref])
    rows, kept = _empty_rows(), []
    for index, path in enumerate(paths):
        if path is None:
            listing.rejects.append({"uri": f"{where}#row{index}", "member": None,
                                    "reason": f"empty {config.path_column!r} cell"})
            continue
        if source.roots:
            candidate = (path if path.startswith("/") or "://" in path or path.startswith("file:")
                         else f"{base_dir.rstrip('/')}/{path}")
            uri, refused = _manifest_entry(source.roots, candidate)
            if refused:
                listing.rejects.append({"uri": f"{where}#row{index}", "member": None,
                                        "reason": f"{config.path_column!r} cell refused: "
                                                  f"{refused}"})
                continue
        else:
            uri = path if path.startswith("/") or "://" in path else _join_uri(base_dir, path)
        problem = _label_problem(labels[index], config, f"empty {label_column!r} cell")
        if problem:
            listing.rejects.append({"uri": uri, "member": None, "reason": problem})
            continue
        for key, value in zip(("uri", "member", "relpath", "label", "split"),
                              (uri, None, path, labels[index], splits[index])):
            rows[key].append(value)
        kept.append(index)
    listing.items = _items_table(rows, metadata.take(pa.array(kept, pa.int64())))
    return listing


# -- MedMNIST npz --------------------------------------------------------------------------------
def _npz_error(uri: str, exc: Exception) -> MedcurateError:
    return MedcurateError(f"{uri} is not a readable .npz: {exc}")


def list_npz(config: IngestConfig, source: _Source) -> Listing:
    # A folder (--format npz on the wrong source), an empty or garbled file and a plain .npy
    # each used to end in a traceback (OSError, EOFError, BadZipFile, AttributeError).
    # Only the members' headers are read (their counts); each is checked against
    # MEDCURATE_MAX_DECOMPRESSED_BYTES before anything is decompressed (a zip bomb is refused).
    if source.is_dir:
        raise MedcurateError(f"{source.uri} is a folder; the npz reader needs one .npz file")
    digest, _ = file_sha256(source.fs, source.path)
    listing = Listing(format="npz", items=pa.table({}),
                      inputs=[InputRef(role="source", uri=source.uri, sha256=digest)])
    rows = _empty_rows()
    name = posixpath.basename(source.path)
    with source.fs.open_input_file(source.path) as handle:
        if handle.read(6) == b"\x93NUMPY":
            raise MedcurateError(f"{source.uri} is a single array, not an .npz archive of "
                                 "'<split>_images' arrays")
        handle.seek(0)
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _npz_error(source.uri, exc) from None
        with archive:
            members = [m[:-len(".npy")] for m in archive.namelist() if m.endswith(".npy")]
            splits = sorted(k[: -len("_images")] for k in members if k.endswith("_images"))
            if not splits:
                raise MedcurateError(f"{source.uri} holds no '<split>_images' array (MedMNIST "
                                     "layout)")
            for split in splits:
                try:
                    shape = npz_member_shape(archive, f"{split}_images")
                    count = shape[0] if shape else 0
                    labels = None
                    if f"{split}_labels" in members:
                        labels = npz_member(archive, f"{split}_labels").reshape(count, -1)
                except ImageError as exc:
                    raise MedcurateError(f"{source.uri}: {exc}") from None
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                    raise _npz_error(source.uri, exc) from None
                if labels is not None:
                    if labels.shape[1] != 1:
                        raise MedcurateError(f"{source.uri}: {split}_labels has "
                                             f"{labels.shape[1]} labels per image; multi-label "
                                             "archives are not supported")
                    labels = [str(int(v)) for v in labels[:, 0]]
                elif config.unlabeled:
                    labels = [None] * count
                else:
                    raise MedcurateError(f"{source.uri} has no {split}_labels (pass "
                                         "--unlabeled)")
                for index in range(count):
                    member = f"{split}/{index}"
                    for key, value in zip(("uri", "member", "relpath", "label", "split"),
                                          (source.base, member, f"{name}/{member}",
                                           labels[index], split_name(split) or split)):
                        rows[key].append(value)
    listing.items = _items_table(rows)
    return listing


# -- WebDataset tar shards -----------------------------------------------------------------------
def _webdataset_samples(tar: tarfile.TarFile, limit: int | None
                        ) -> tuple[dict[str, dict[str, tuple[str, bytes | None]]], str | None]:
    """Every sample of a shard: ``{key: {ext: (member name, bytes of .json/.cls or None)}}``,
    in ONE pass over the tar (a ``.tar.gz`` is a stream: it cannot seek back), reading only
    the small text members. ``limit``: where a compressed shard stops being read (its
    decompressed size), with the reason as the second value."""
    samples: dict[str, dict[str, tuple[str, bytes | None]]] = defaultdict(dict)
    for member in tar:
        if limit is not None and member.offset_data + member.size > limit:
            return samples, (f"the shard decompresses to over {limit:,} bytes "
                             f"({MAX_DECOMPRESSED_ENV}); a possible decompression bomb, not "
                             "read further")
        if not member.isfile():
            continue
        directory, base = posixpath.split(member.name)
        key, _, ext = base.partition(".")
        ext = ext.lower()
        data = None
        if ext in ("json", "cls") and member.size <= WEBDATASET_TEXT_BYTES:
            data = tar.extractfile(member).read()
        samples[posixpath.join(directory, key)][ext] = (member.name, data)
    return samples, None


def _sample_meta(parts: dict[str, tuple[str, bytes | None]]) -> dict:
    data = parts.get("json", (None, None))[1]
    try:
        meta = json.loads(data) if data is not None else {}
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}  # e.g. a JSON list: no named fields


def list_webdataset(config: IngestConfig, source: _Source) -> Listing:
    shards = [rel for rel in source.files() if rel.endswith(TAR_SUFFIXES) or rel == ""]
    listing = Listing(format="webdataset", items=pa.table({}))
    rows, meta_rows = _empty_rows(), []
    label_key = config.label_column or "label"
    for rel in shards:
        uri = source.uri_of(rel)
        shard_name = posixpath.basename(rel or source.path)
        split = split_of_file(shard_name) or _folder_label_split(rel)[1]
        compressed = (rel or source.path).lower().endswith(COMPRESSED_TAR_SUFFIXES)
        try:
            # A compressed shard is streamed (one pass, bounded); a plain one is read by
            # seeking from header to header, its images never read here.
            opener = source.fs.open_input_stream if compressed else source.fs.open_input_file
            with opener(source.path_of(rel)) as stream, \
                    tarfile.open(fileobj=stream, mode="r|*" if compressed else "r:*") as tar:
                samples, cut = _webdataset_samples(
                    tar, max_decompressed_bytes() if compressed else None)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            listing.rejects.append({"uri": uri, "member": None,
                                    "reason": f"unreadable tar shard: {exc}"})
            continue
        if cut:
            listing.rejects.append({"uri": uri, "member": None, "reason": cut})
        for key, parts in sorted(samples.items()):
            image_ext = next((e for e in parts if "." + e.split(".")[-1] in IMAGE_SUFFIXES),
                             None)
            if image_ext is None:
                listing.rejects.append({"uri": uri, "member": key,
                                        "reason": "sample has no image member"})
                continue
            meta = _sample_meta(parts)
            label = meta.pop(label_key, None)
            if "cls" in parts:
                text = parts["cls"][1]
                label = text.decode(errors="replace").strip() if text is not None else None
            label = None if label in (None, "") else str(label)
            member = parts[image_ext][0]
            problem = _label_problem(label, config, f"no .cls and no '{label_key}' in .json")
            if problem:
                listing.rejects.append({"uri": uri, "member": member, "reason": problem})
                continue
            for k, v in zip(("uri", "member", "relpath", "label", "split"),
                            (uri, member, f"{rel}#{member}", label, split)):
                rows[k].append(v)
            meta_rows.append({k: v for k, v in meta.items()
                              if isinstance(v, (str, int, float, bool))})
    metadata = _metadata_columns(_rows_table(meta_rows), set()) if any(meta_rows) else None
    listing.items = _items_table(rows, metadata)
    return listing


def _rows_table(rows: list[dict]) -> pa.Table:
    """A table of per-sample metadata dicts whose keys differ from sample to sample.

    ``pa.Table.from_pylist`` takes its columns from the first row only, so a first sample
    without a ``.json`` (or with fewer fields) silently dropped every metadata column. Columns
    here are the union of all keys, in first-seen order, null where a sample lacks one; a
    column whose values mix types (``1`` in one sample, ``"1"`` in another) becomes strings.
    """
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


# -- Parquet files of image bytes ----------------------------------------------------------------
def _image_column(schema: pa.Schema, wanted: str | None) -> str | None:
    if wanted:
        return wanted if wanted in schema.names else None
    for f in schema:
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            return f.name
        if pa.types.is_struct(f.type) and any(c.name == "bytes" for c in f.type):
            return f.name
    return None


def list_parquet(config: IngestConfig, source: _Source) -> Listing:
    files = [rel for rel in source.files() if rel.endswith(".parquet") or rel == ""]
    if not files:  # --format parquet on a folder without any (was an IndexError)
        raise MedcurateError(f"source {source.uri} holds no .parquet files")
    first = pq.read_schema(source.path_of(files[0]), filesystem=source.fs)
    image_column = _image_column(first, config.image_column)
    if image_column is None:
        if config.image_column:
            raise MedcurateError(f"{source.uri} has no column {config.image_column!r}")
        if source.is_dir:
            raise MedcurateError(f"{source.uri}: Parquet files hold no image bytes column; "
                                 "a manifest of paths must be a single file")
        table, ref = read_table(source.uri)
        return list_path_table(config, source, table, ref, "parquet")
    listing = Listing(format="parquet", items=pa.table({}))
    rows, metadata_parts = _empty_rows(), []
    label_column = config.label_column or "label"
    for rel in files:
        uri = source.uri_of(rel)
        path = source.path_of(rel)
        schema = pq.read_schema(path, filesystem=source.fs)
        columns = [c for c in schema.names if c != image_column]
        table = pq.read_table(path, filesystem=source.fs, columns=columns)
        if label_column not in table.column_names and not config.unlabeled:
            raise MedcurateError(f"{uri} has no label column {label_column!r} "
                                 "(pass --label-column or --unlabeled)")
        labels = (_as_strings(table.column(label_column)) if label_column in table.column_names
                  else [None] * table.num_rows)
        kept = []
        for index, label in enumerate(labels):
            member = f"{image_column}/{index}"
            problem = _label_problem(label, config, f"empty {label_column!r} cell")
            if problem:
                listing.rejects.append({"uri": uri, "member": member, "reason": problem})
                continue
            split = _folder_label_split(rel)[1] or split_of_file(rel or source.path)
            for k, v in zip(("uri", "member", "relpath", "label", "split"),
                            (uri, member, f"{rel}#{member}", label, split)):
                rows[k].append(v)
            kept.append(index)
        metadata_parts.append(_metadata_columns(table, {label_column}).take(
            pa.array(kept, pa.int64())))
    metadata = pa.concat_tables(metadata_parts, promote_options="permissive")
    listing.items = _items_table(rows, metadata)
    return listing


# -- dispatch -----------------------------------------------------------------------------------
def detect_format(source: _Source) -> str:
    name = source.path.lower()
    if not source.is_dir:
        for suffixes, fmt in (((".npz",), "npz"), ((".csv", ".tsv"), "csv"),
                              ((".parquet",), "parquet"), (TAR_SUFFIXES, "webdataset"),
                              (DICOM_SUFFIXES, "dicom")):
            if name.endswith(suffixes):
                return fmt
        return "folder"
    files = source.files()
    if files and all(f.endswith(TAR_SUFFIXES) for f in files):
        return "webdataset"
    if files and all(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(f.lower().endswith(DICOM_SUFFIXES) for f in files):
        return "dicom"
    return "folder"


def _confined(roots: Roots, field: str, value: str) -> str:
    try:
        return roots.resolve(value)
    except PathRefused as exc:
        raise PathRefused(f"{field}: refused: {exc}") from None


def list_source(config: IngestConfig) -> Listing:
    """List the images of ``config.source`` with the reader its format names.

    With ``config.confine_to`` (set by the service; ``--confine-to`` on the CLI) the source,
    the metadata table and every file the archive lists or links to must resolve inside those
    roots: the source and table are refused (``PathRefused``), anything else is a reject."""
    roots = Roots(config.confine_to) if config.confine_to else None
    if roots:
        update = {"source": _confined(roots, "source", config.source)}
        if config.metadata:
            update["metadata"] = _confined(roots, "metadata", config.metadata)
        config = config.model_copy(update=update)
    source = _Source(config.source, roots)
    fmt = detect_format(source) if config.format == "auto" else config.format
    if fmt in ("folder", "dicom"):
        listing = list_folder(config, source, fmt)
    elif fmt == "csv":
        table, ref = read_table(config.source)
        listing = list_path_table(config, source, table, ref, "csv")
    elif fmt == "npz":
        listing = list_npz(config, source)
    elif fmt == "webdataset":
        listing = list_webdataset(config, source)
    elif fmt == "parquet":
        listing = list_parquet(config, source)
    else:  # pragma: no cover - the config's Literal type rules this out
        raise MedcurateError(f"unknown format {fmt!r}")
    listing.rejects[:0] = source.rejects
    if listing.items.num_rows == 0 and not listing.rejects:
        raise MedcurateError(f"source {config.source} holds no image files ({fmt} reader)")
    if not any(ref.role == "source" for ref in listing.inputs):
        listing.inputs.insert(0, InputRef(role="source", uri=config.source))
    return listing
