"""The workspace: one on-disk layout for every artefact medcurate makes.

Layout under the root (a local path or an object-store URI, both through ``pyarrow.fs``)::

    collections/<name>/    manifest.parquet, rejects.parquet, provenance.json
    embeddings/<run-id>/   shards/*.parquet, provenance.json
    selections/<id>/       selection.parquet, summary.json, report.html, provenance.json
    jobs/<id>/             job records, Ray Train storage
    models/<name>/         model.pt, provenance.json (MAE pretraining)
    scores/<id>/           scores.csv, scores.json, agreement.csv, provenance.json

An artefact is complete exactly when its ``provenance.json`` exists: it is written last, so a
crash leaves either the previous complete artefact or a staging folder nobody reads, never a
half-written artefact that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from medcurate.errors import AlreadyExists, MedcurateError, NotFound

ARTEFACT_KINDS = ("collections", "embeddings", "selections", "models", "jobs", "scores",
                  "audits", "comparisons")
PROVENANCE_FILE = "provenance.json"
STAGING_DIR = ".staging"
DEFAULT_WORKSPACE = "./medcurate-workspace"
# Matched with ``fullmatch``: a ``$`` anchor would also accept a trailing newline ("x\n").
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or any URI pyarrow understands."""
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def validate_key(key: str) -> str:
    """Artefact keys become folder names: refuse anything that could escape or hide."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise MedcurateError(
            f"invalid name {key!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return key


class Workspace:
    """Addresses and writes artefacts; every write is atomic (temp file, then rename)."""

    def __init__(self, root: str | None = None):
        self.uri = root or os.environ.get("MEDCURATE_WORKSPACE") or DEFAULT_WORKSPACE
        self.fs, self.root = resolve_filesystem(self.uri)

    def __repr__(self) -> str:
        return f"Workspace({self.uri!r})"

    # -- addressing -------------------------------------------------------------------------
    def path(self, kind: str, key: str, *parts: str) -> str:
        if kind not in ARTEFACT_KINDS:
            raise ValueError(f"unknown artefact kind {kind!r}")
        return "/".join([self.root, kind, validate_key(key), *parts])

    def local_path(self, kind: str, key: str, *parts: str) -> Path:
        """A local filesystem path, for tools (Ray Train, HTML viewers) that need one."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            raise MedcurateError(f"{self.uri} is not a local workspace")
        return Path(self.path(kind, key, *parts))

    def location(self, kind: str, key: str, *parts: str) -> str:
        """Where a file of an artefact is, as a manifest ``uri`` (read back through pyarrow.fs
        from any node): a local path, or the object-store path with the workspace's scheme."""
        path = self.path(kind, key, *parts)
        if isinstance(self.fs, pafs.LocalFileSystem):
            return path
        return f"{self.uri.split('://', 1)[0]}://{path}"

    def exists(self, kind: str, key: str) -> bool:
        return self._is_file(self.path(kind, key, PROVENANCE_FILE))

    def list(self, kind: str) -> list[str]:
        """Keys of the complete artefacts of one kind, sorted."""
        base = "/".join([self.root, kind])
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        # Folders whose names are not valid keys (staging, or made by hand) are not artefacts;
        # skipping them keeps one stray folder from breaking every listing.
        keys = [
            info.base_name
            for info in self.fs.get_file_info(pafs.FileSelector(base))
            if info.type == pafs.FileType.Directory and _KEY_PATTERN.fullmatch(info.base_name)
        ]
        return sorted(k for k in keys if self.exists(kind, k))

    def require(self, kind: str, key: str) -> str:
        """The artefact's folder, or a clear error naming what exists."""
        if not self.exists(kind, key):
            known = ", ".join(self.list(kind)) or "none"
            raise NotFound(
                f"no {kind[:-1]} named {key!r} in workspace {self.uri} (known: {known})"
            )
        return self.path(kind, key)

    # -- reading ----------------------------------------------------------------------------
    def read_json(self, path: str) -> dict:
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode("utf-8"))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def provenance(self, kind: str, key: str) -> dict:
        return self.read_json(self.path(kind, key, PROVENANCE_FILE))

    # -- atomic writing ---------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write to a temporary sibling, then rename over the target."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, path)
        except BaseException:
            self._delete_quietly(tmp)
            raise

    def write_json(self, path: str, payload: dict) -> None:
        text = json.dumps(payload, indent=2, sort_keys=True, default=str)
        self.write_bytes(path, text.encode("utf-8"))

    def write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(path, sink.getvalue().to_pybytes())

    @contextmanager
    def stage(self, kind: str, key: str, overwrite: bool = False) -> Iterator[str]:
        """Build an artefact in a private staging folder and publish it whole.

        The caller writes every file, provenance last, into the yielded folder. On success the
        folder replaces ``<kind>/<key>``; on any error it is deleted and an earlier artefact of
        the same key is left untouched. Without ``overwrite`` an existing artefact is an error
        raised before any work starts, and again before publishing: of two writers of one key
        at once (two HTTP requests), the later gets ``AlreadyExists`` and replaces nothing.
        """
        final = self.path(kind, key)
        self.refuse_existing(kind, key, overwrite)
        staging = "/".join([self.root, kind, STAGING_DIR, f"{key}-{uuid.uuid4().hex[:12]}"])
        self.fs.create_dir(staging, recursive=True)
        try:
            yield staging
            if not self._is_file(f"{staging}/{PROVENANCE_FILE}"):
                raise RuntimeError(f"staged {kind[:-1]} {key!r} has no provenance")
            self.refuse_existing(kind, key, overwrite)
            try:
                self._publish(staging, final)
            except OSError as exc:
                if not self.exists(kind, key):
                    raise
                raise AlreadyExists(f"{kind[:-1]} {key!r} was published by another writer at "
                                    "the same time; this run published nothing") from exc
        except BaseException:
            self._delete_quietly(staging, directory=True)
            raise

    def _publish(self, staging: str, final: str) -> None:
        """Swap the staged folder in; if that fails, the earlier artefact goes back in place."""
        retired = None
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            retired = f"{staging}.retired"
            self.fs.move(final, retired)
        try:
            self.fs.move(staging, final)
        except BaseException:
            if retired and self.fs.get_file_info(final).type == pafs.FileType.NotFound:
                self.fs.move(retired, final)
            elif retired:  # another writer's artefact took the place: the retired one is stale
                self._delete_quietly(retired, directory=True)
            raise
        if retired:
            self._delete_quietly(retired, directory=True)

    def refuse_existing(self, kind: str, key: str, overwrite: bool,
                        rename: str = "choose another name") -> None:
        """Fail before any work when the artefact exists and no overwrite was asked for."""
        if self.exists(kind, key) and not overwrite:
            raise AlreadyExists(f"{kind[:-1]} {key!r} already exists in {self.uri}; "
                                f"pass --overwrite to replace it or {rename}")

    def _is_file(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _delete_quietly(self, path: str, directory: bool = False) -> None:
        try:
            if directory:
                self.fs.delete_dir(path)
            else:
                self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass
