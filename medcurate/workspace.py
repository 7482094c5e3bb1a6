"""The workspace: one layout and one publish protocol for every artefact medcurate makes.

The root is a local path or an object-store URI (``s3://bucket/prefix``, ``gs://…``), all read
and written through ``pyarrow.fs``. Every artefact is stored as immutable versions plus a chain
of small commit objects::

    <kind>/<key>/versions/<version>/   the artefact's files, provenance.json among them
    <kind>/<key>/commits/<seq>.json    {"version": …}: the highest seq names the live version

The kinds (collections, embeddings, selections, maps, models, scores, audits, comparisons) are
declared once in ``ARTEFACTS``, each with the result fields that name an artefact and what
publishing to a key that exists does (return it, or refuse unless overwriting); ``jobs/<id>/``
is scratch (Ray Train storage), not versioned. Around the protocol the module holds what every
command needs of the store: files, JSON and Parquet tables read and written by path, lookup of
artefacts by their recorded config (``find``, ``reusable``), ``gc``, and the one message for a
store that failed (``store_error_message``).

Why this shape: object stores have no directory rename and no atomic multi-file publish, but
S3 (``If-None-Match: *``), GCS (generation precondition) and a local disk (``link``) can all
create one small object only if it is absent. So a writer puts every file under a fresh version
folder nobody reads, then publishes with one create-if-absent commit ``seq + 1``: of two
concurrent writers exactly one wins, readers resolve the highest commit and so only ever see a
complete version, and an overwrite never has a moment where the artefact is missing or mixes
versions. A crash leaves an uncommitted version folder: ``medcurate gc`` (and every publish,
for its own key) sweeps versions that are neither live nor younger than a grace period.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from medcurate.errors import AlreadyExists, MedcurateError, NotFound

if TYPE_CHECKING:
    from pydantic import BaseModel

# What running a command again with the key of a finished artefact does:
# "return-existing": the artefact is returned as it is, nothing is computed (the key is a
#   digest of what shapes it, or naming the same key means asking for the same thing);
# "refuse-unless-overwrite": an error before any work, unless --overwrite replaces it.
ReusePolicy = Literal["return-existing", "refuse-unless-overwrite"]


@dataclass(frozen=True)
class ArtefactKind:
    """One kind of artefact: its folder, the fields of a publishing command's result that hold
    an artefact's key, and what publishing to a key that exists does."""

    kind: str
    key_fields: tuple[str, ...]  # one per command wording; empty: no command's result names it
    reuse: ReusePolicy


ARTEFACTS: dict[str, ArtefactKind] = {a.kind: a for a in (
    # ingest refuses; curate reuses an identical ingest (Workspace.reusable)
    ArtefactKind("collections", ("collection",), "refuse-unless-overwrite"),
    ArtefactKind("embeddings", ("run_id",), "return-existing"),  # embed resumes, then reuses
    ArtefactKind("selections", ("selection_id",), "refuse-unless-overwrite"),
    # a run's class maps, made inside select under a digest of the run and the map's params
    ArtefactKind("maps", (), "return-existing"),
    ArtefactKind("models", ("run_id", "name"), "refuse-unless-overwrite"),  # finetune, pretrain
    ArtefactKind("scores", ("score_id",), "return-existing"),
    ArtefactKind("audits", ("audit_id",), "refuse-unless-overwrite"),
    ArtefactKind("comparisons", ("comparison_id",), "refuse-unless-overwrite"),
    ArtefactKind("dedups", ("dedup_id",), "refuse-unless-overwrite"),
)}
ARTEFACT_KINDS = tuple(ARTEFACTS)
# Config fields that do not shape an artefact: whether it may replace one, and the roots the
# service confines reading to (not recorded in provenance).
UNSHAPING_FIELDS = frozenset({"overwrite", "confine_to"})
SCRATCH_KIND = "jobs"
PROVENANCE_FILE = "provenance.json"
VERSIONS_DIR = "versions"
COMMITS_DIR = "commits"
DEFAULT_WORKSPACE = "./medcurate-workspace"
# Versions that are not live are kept this long, so a reader that resolved the previous
# version a moment before an overwrite can finish reading it.
GRACE_SECONDS = 24 * 3600
# Matched with ``fullmatch``: a ``$`` anchor would also accept a trailing newline ("x\n").
MAX_KEY_LENGTH = 128
_KEY_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_KEY_LENGTH - 1}}}")
_COMMIT_PATTERN = re.compile(r"(\d{12})\.json")
_VERSION_TIME = "%Y%m%dT%H%M%S%fZ"


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or any URI pyarrow understands."""
    if "://" in uri and not uri.startswith("file://"):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as exc:
            raise MedcurateError(f"workspace {uri}: {exc}") from None
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def artefact_kind(kind: str) -> ArtefactKind:
    if kind not in ARTEFACTS:
        raise MedcurateError(f"unknown artefact kind {kind!r}; kinds: {', '.join(ARTEFACTS)}")
    return ARTEFACTS[kind]


def shaping_fields(config: BaseModel) -> set[str]:
    """The fields of a command's config that shape the artefact it publishes."""
    return set(type(config).model_fields) - UNSHAPING_FIELDS


def as_recorded(value):
    """A value as provenance records it (``write_json``: JSON, ``str`` for the rest), so a
    requested config compares equal to the recorded one (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=str))


def differing_fields(recorded: dict, wanted: dict, fields: Iterable[str]) -> list[str]:
    """The ``fields`` whose ``wanted`` value is not the ``recorded`` one. A field the record
    lacks (added to the config since the artefact was made) counts as None, its default."""
    return sorted(k for k in fields if recorded.get(k) != as_recorded(wanted.get(k)))


def validate_key(key: str) -> str:
    """Artefact keys become folder names: refuse anything that could escape or hide."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise MedcurateError(
            f"invalid name {key!r}: use 1-{MAX_KEY_LENGTH} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return key


def new_version_id() -> str:
    """Sortable by creation time (the sweep reads a version's age from its name) and unique."""
    return f"{datetime.now(timezone.utc).strftime(_VERSION_TIME)}-{uuid.uuid4().hex[:12]}"


def version_age_seconds(version: str) -> float:
    """Seconds since the version was started; infinite for a name that is not a version's."""
    try:
        started = datetime.strptime(version.split("-", 1)[0], _VERSION_TIME)
    except ValueError:
        return float("inf")
    return time.time() - started.replace(tzinfo=timezone.utc).timestamp()


def file_sha256(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """sha256 and size of one file, streamed."""
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class Head:
    """The live version of an artefact: its commit number and version folder name (seq -1
    and no version for an artefact published before versions existed)."""

    seq: int
    version: str


@dataclass(frozen=True)
class Scratch:
    """A scratch folder of the workspace, for tools that write their own files (Ray Train)."""

    path: str
    filesystem: pafs.FileSystem

    @property
    def ray_filesystem(self) -> pafs.FileSystem | None:
        """What Ray Train's ``RunConfig(storage_filesystem=…)`` takes: None for a local disk."""
        return None if isinstance(self.filesystem, pafs.LocalFileSystem) else self.filesystem

    def delete(self, *parts: str) -> None:
        try:
            self.filesystem.delete_dir("/".join([self.path, *parts]))
        except (FileNotFoundError, OSError):
            pass


class Workspace:
    """Addresses, reads and publishes artefacts; see the module docstring for the protocol."""

    def __init__(self, root: str | None = None):
        self.uri = root or os.environ.get("MEDCURATE_WORKSPACE") or DEFAULT_WORKSPACE
        self.fs, self.root = resolve_filesystem(self.uri)
        self._exclusive = exclusive_writer(self.fs, self.uri)

    def __repr__(self) -> str:
        return f"Workspace({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def worker_root(self) -> str:
        """The root as another process opens it (a Ray worker's working directory may differ):
        a store's URI, a local folder's absolute path."""
        return self.uri if "://" in self.uri else self.root

    def check(self) -> None:
        """Fail early, in one line that names the URI and the fix, where the store cannot be
        read (no such bucket, refused credentials, nothing listening), before any work."""
        if self.is_local:
            return
        try:
            self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
            bucket = self.fs.get_file_info(self.root.split("/", 1)[0])
        except OSError as exc:
            raise MedcurateError(store_error_message(self.uri, exc)) from None
        if bucket.type == pafs.FileType.NotFound:  # some servers list a missing bucket as empty
            raise MedcurateError(store_error_message(self.uri, OSError(
                f"bucket does not exist: {bucket.path}")))

    # -- addressing -------------------------------------------------------------------------
    def artefact_root(self, kind: str, key: str) -> str:
        return "/".join([self.root, artefact_kind(kind).kind, validate_key(key)])

    def version_folder(self, kind: str, key: str, version: str) -> str:
        if not version:  # the pre-versioning layout, read in place
            return self.artefact_root(kind, key)
        return "/".join([self.artefact_root(kind, key), VERSIONS_DIR, version])

    def head(self, kind: str, key: str) -> Head | None:
        """The live version (highest commit), or None where nothing was ever published."""
        commits = "/".join([self.artefact_root(kind, key), COMMITS_DIR])
        for _ in range(8):
            seqs = [int(m.group(1)) for info in self.listing(commits)
                    if (m := _COMMIT_PATTERN.fullmatch(info.base_name))]
            if not seqs:  # an artefact written before versions existed: files in the root
                legacy = self.is_file("/".join([self.artefact_root(kind, key), PROVENANCE_FILE]))
                return Head(seq=-1, version="") if legacy else None
            try:
                record = self.read_json(f"{commits}/{_commit_name(max(seqs))}")
            except FileNotFoundError:
                continue  # a newer commit came and the sweep removed this one: list again
            return Head(seq=max(seqs), version=record["version"])
        raise OSError(f"{kind[:-1]} {key!r}: its commits changed under every read; try again")

    def path(self, kind: str, key: str, *parts: str) -> str:
        """A file of the live version of an artefact (NotFound where there is none)."""
        return "/".join([self.require(kind, key), *parts])

    def location(self, folder_path: str) -> str:
        """A workspace path as a URI that any node reads back through ``pyarrow.fs`` (the
        scheme and the workspace's query parameters, such as ``endpoint_override``, kept)."""
        if self.is_local:
            return folder_path
        parts = urlsplit(self.uri)
        return f"{parts.scheme}://{folder_path}" + (f"?{parts.query}" if parts.query else "")

    def exists(self, kind: str, key: str) -> bool:
        return self.head(kind, key) is not None

    def list(self, kind: str) -> list[str]:
        """Keys of the published artefacts of one kind, sorted."""
        artefact_kind(kind)
        # Folders whose names are not valid keys (made by hand) are not artefacts; skipping
        # them keeps one stray folder from breaking every listing.
        keys = [info.base_name for info in self.listing("/".join([self.root, kind]))
                if info.type == pafs.FileType.Directory
                and _KEY_PATTERN.fullmatch(info.base_name)]
        return sorted(k for k in keys if self.exists(kind, k))

    def find(self, kind: str, **where) -> list[str]:
        """Keys of the published artefacts of one kind whose recorded config has every value
        of ``where`` (``find("selections", strategy="kcenter", seed=0)``), sorted."""
        return [key for key in self.list(kind)
                if not differing_fields(self.provenance(kind, key).get("config") or {},
                                        where, where)]

    def reusable(self, kind: str, key: str, config: dict, compared: Iterable[str],
                 fix: str = "pass --overwrite to replace it or choose another name"
                 ) -> dict | None:
        """The provenance of artefact ``key`` when one exists made with the same ``config`` on
        the ``compared`` fields (those that shape it); None where there is none. One made
        otherwise is an error naming the fields that differ and ``fix``: reusing it would
        pass off an artefact made from other inputs as the one asked for."""
        if not self.exists(kind, key):
            return None
        record = self.provenance(kind, key)
        differ = differing_fields(record.get("config") or {}, config, compared)
        if differ:
            raise MedcurateError(f"{kind[:-1]} {key!r} in {self.uri} exists with other "
                                 f"settings ({', '.join(differ)}); {fix}")
        return record

    def require(self, kind: str, key: str) -> str:
        """The live version's folder, or a clear error naming what exists."""
        head = self.head(kind, key)
        if head is None:
            known = ", ".join(self.list(kind)) or "none"
            raise NotFound(
                f"no {kind[:-1]} named {key!r} in workspace {self.uri} (known: {known})"
            )
        return self.version_folder(kind, key, head.version)

    def scratch(self, key: str) -> Scratch:
        """``jobs/<key>``: Ray Train storage, on the workspace's own store so that every node
        reaches it (checkpoints survive the loss of the node that wrote them)."""
        return Scratch("/".join([self.root, SCRATCH_KIND, validate_key(key)]), self.fs)

    # -- reading ----------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def read_json(self, path: str) -> dict:
        return json.loads(self.read_bytes(path).decode("utf-8"))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def provenance(self, kind: str, key: str) -> dict:
        return self.read_json(self.path(kind, key, PROVENANCE_FILE))

    def is_file(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    # -- writing files ----------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write one file whole. An object store's PUT is atomic by itself; on a local disk
        the bytes go to a temporary sibling that is renamed over the target."""
        if not self.is_local:
            with self.fs.open_output_stream(path) as out:
                out.write(data)
            return
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

    def upload_folder(self, local: str | Path, path: str) -> None:
        """Copy a local folder's files (made by a tool that needs a local path) under ``path``."""
        local = Path(local)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            self.write_bytes(f"{path}/{file.relative_to(local).as_posix()}", file.read_bytes())

    # -- publishing -------------------------------------------------------------------------
    def drafts(self, kind: str, key: str) -> list[str]:
        """Versions of an artefact that were started and never finished (no provenance yet;
        oldest first): a resumable command (embedding) continues one instead of starting again."""
        head = self.head(kind, key)
        versions = self.listing("/".join([self.artefact_root(kind, key), VERSIONS_DIR]))
        return sorted(info.base_name for info in versions
                      if info.type == pafs.FileType.Directory
                      and (head is None or info.base_name != head.version)
                      and not self.is_file(f"{info.path}/{PROVENANCE_FILE}"))

    def new_draft(self, kind: str, key: str) -> str:
        """A fresh, private version folder to write an artefact into."""
        folder = self.version_folder(kind, key, new_version_id())
        if self.is_local:
            self.fs.create_dir(folder, recursive=True)
        return folder

    @contextmanager
    def stage(self, kind: str, key: str, overwrite: bool = False) -> Iterator[str]:
        """Build an artefact in a private version folder and publish it whole.

        The caller writes every file, ``provenance.json`` among them, into the yielded folder.
        On success :meth:`publish` commits it; on any error the folder is deleted and an earlier
        artefact of the same key is untouched. Without ``overwrite`` an existing artefact is an
        error raised before any work starts, and again at the commit: of two writers of one key
        at once (two HTTP requests), the later gets ``AlreadyExists`` and replaces nothing.
        """
        if self.exists(kind, key) and not overwrite:  # whatever the kind's reuse policy
            raise self._taken(kind, key, "choose another name")
        folder = self.new_draft(kind, key)
        try:
            yield folder
            self.publish(kind, key, folder, overwrite=overwrite)
        except BaseException:
            self._delete_quietly(folder, directory=True)
            self._prune_empty(kind, key)
            raise

    def publish(self, kind: str, key: str, folder: str, overwrite: bool = False,
                based_on: Head | None = None) -> None:
        """Make a draft version live: record the sha256 and size of every file in its
        ``provenance.json``, then write the commit object last, create-if-absent.

        ``based_on``: the version the draft was derived from (``amend``); the commit is then
        ``based_on.seq + 1`` exactly, so a writer that published in between wins and this
        draft is refused with ``AlreadyExists``, never laid over the newer version."""
        provenance_path = f"{folder}/{PROVENANCE_FILE}"
        if not self.is_file(provenance_path):
            raise RuntimeError(f"staged {kind[:-1]} {key!r} has no provenance")
        record = self.read_json(provenance_path)
        if isinstance(record, dict):
            record["outputs"] = self._hash_outputs(folder, record.get("outputs") or {})
            self.write_json(provenance_path, record)
        head = self.head(kind, key) if based_on is None else based_on
        if head is not None and not overwrite:
            raise AlreadyExists(f"{kind[:-1]} {key!r} already exists in {self.uri}; "
                                "pass --overwrite to replace it or choose another name")
        seq = 0 if head is None else head.seq + 1
        commit = json.dumps({"version": folder.rsplit("/", 1)[1], "seq": seq,
                             "committed_at": datetime.now(timezone.utc).isoformat()}).encode()
        commits = "/".join([self.artefact_root(kind, key), COMMITS_DIR])
        if not self._exclusive(f"{commits}/{_commit_name(seq)}", commit):
            raise AlreadyExists(f"{kind[:-1]} {key!r} was published by another writer at the "
                                "same time; this run published nothing")
        self.sweep(kind, key)

    def amend(self, kind: str, key: str, files: dict[str, bytes]) -> bool:
        """Publish a new version of a live artefact: its files with ``files`` added (or
        replaced), the provenance's hashes brought up to date. For what is made later from a
        published artefact, such as a selection's report drawn after the selection was
        answered. False, and nothing changed, where another writer published the artefact
        since this call read it: the added files describe a version that is no longer live."""
        head = self.head(kind, key)
        if head is None:
            raise NotFound(f"no {kind[:-1]} named {key!r} in workspace {self.uri}")
        source = self.version_folder(kind, key, head.version)
        folder = self.new_draft(kind, key)
        try:
            for info in self.fs.get_file_info(pafs.FileSelector(source, recursive=True)):
                name = info.path[len(source) + 1:]
                top = name.split("/", 1)[0]
                if info.type != pafs.FileType.File or name in files or \
                        (not head.version and top in (VERSIONS_DIR, COMMITS_DIR)):
                    continue
                if self.is_local:
                    self.fs.create_dir(f"{folder}/{name}".rsplit("/", 1)[0], recursive=True)
                self.fs.copy_file(info.path, f"{folder}/{name}")
            for name, data in files.items():
                self.write_bytes(f"{folder}/{name}", data)
            self.publish(kind, key, folder, overwrite=True, based_on=head)
            return True
        except AlreadyExists:
            self._delete_quietly(folder, directory=True)
            return False
        except BaseException:
            self._delete_quietly(folder, directory=True)
            raise

    def _hash_outputs(self, folder: str, declared: dict) -> dict:
        """Every file of the version except the sidecar, hashed here: what a writer declared
        keeps its extra fields (row counts), the hash and size are always measured."""
        outputs = {}
        for info in self.fs.get_file_info(pafs.FileSelector(folder, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            name = info.path[len(folder) + 1:]
            if name == PROVENANCE_FILE:
                continue
            sha256, size = file_sha256(self.fs, info.path)
            outputs[name] = {**(declared.get(name) or {}), "sha256": sha256, "bytes": size}
        return dict(sorted(outputs.items()))

    def existing(self, kind: str, key: str, overwrite: bool,
                 rename: str = "choose another name") -> dict | None:
        """What a command does, before any work, when its key is taken: the kind's policy in
        ``ARTEFACTS``. None: nothing to reuse (absent, or ``overwrite``); the artefact's
        provenance record for a kind that returns the existing artefact; ``AlreadyExists``
        for a kind that refuses unless overwriting."""
        if overwrite or not self.exists(kind, key):
            return None
        if ARTEFACTS[kind].reuse == "return-existing":
            return self.provenance(kind, key)
        raise self._taken(kind, key, rename)

    def _taken(self, kind: str, key: str, rename: str) -> AlreadyExists:
        return AlreadyExists(f"{kind[:-1]} {key!r} already exists in {self.uri}; "
                             f"pass --overwrite to replace it or {rename}")

    # -- garbage ----------------------------------------------------------------------------
    def sweep(self, kind: str, key: str, grace_seconds: float = GRACE_SECONDS) -> list[str]:
        """Delete the versions of one artefact that are not live and older than the grace
        period (crashed drafts, superseded versions), and the commits below the live one that
        are as old."""
        head = self.head(kind, key)
        root = self.artefact_root(kind, key)
        removed = []
        for info in self.listing(f"{root}/{VERSIONS_DIR}"):
            version = info.base_name
            if (head is not None and version == head.version) or \
                    version_age_seconds(version) < grace_seconds:
                continue
            self._delete_quietly(info.path, directory=True)
            removed.append(f"{kind}/{key}/{VERSIONS_DIR}/{version}")
        if head is not None:  # old commits go after the grace period too: a reader listing
            for info in self.listing(f"{root}/{COMMITS_DIR}"):  # now must still find one
                match = _COMMIT_PATTERN.fullmatch(info.base_name)
                if match and int(match.group(1)) < head.seq and _age_seconds(info) >= grace_seconds:
                    self._delete_quietly(info.path)
        return removed

    def gc(self, grace_seconds: float = GRACE_SECONDS) -> list[str]:
        """Sweep every artefact of every kind; returns the version folders removed."""
        removed = []
        for kind in ARTEFACT_KINDS:
            for info in self.listing("/".join([self.root, kind])):
                if info.type == pafs.FileType.Directory and _KEY_PATTERN.fullmatch(info.base_name):
                    removed += self.sweep(kind, info.base_name, grace_seconds)
        return removed

    # -- helpers ----------------------------------------------------------------------------
    def listing(self, folder: str) -> list[pafs.FileInfo]:
        """The entries of a folder; none where it does not exist (an object store has no empty
        folders, so a missing prefix is simply nothing there)."""
        try:
            return self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except FileNotFoundError:
            return []

    def _prune_empty(self, kind: str, key: str) -> None:
        """On a local disk, drop the folders a failed first write left empty (an object store
        has no empty folders to leave)."""
        if self.is_local:
            root = self.artefact_root(kind, key)
            for folder in (f"{root}/{VERSIONS_DIR}", root):
                try:
                    os.rmdir(folder)
                except OSError:  # not empty (or gone): it holds something else
                    return

    def _delete_quietly(self, path: str, directory: bool = False) -> None:
        try:
            if directory:
                self.fs.delete_dir(path)
            else:
                self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass


_STORE_FIXES = (
    (("NoSuchBucket", "bucket does not exist", "Bucket does not exist", "NO_SUCH_BUCKET"),
     "the bucket does not exist: create it first (e.g. `aws s3 mb s3://BUCKET`) or fix the URI"),
    (("InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "SignatureDoesNotMatch",
      "SIGNATURE_DOES_NOT_MATCH", "AccessDenied", "ACCESS_DENIED", "HTTP status 403",
      "credentials"),
     "the store refused the credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
     "the node's role) to ones allowed to read and write this prefix"),
    (("Couldn't connect", "connect to", "Connection refused", "resolve host", "NETWORK_CONNECTION",
      "Timeout was reached", "timed out"),
     "the store's endpoint does not answer: check AWS_ENDPOINT_URL / endpoint_override and "
     "that the server is up"),
)


def store_error_message(uri: str, exc: OSError) -> str:
    """One line for a failed store operation: the workspace URI, what the store said, the fix."""
    said = " ".join(str(exc).split())
    fix = next((fix for needles, fix in _STORE_FIXES if any(n in said for n in needles)),
               "check the URI, the credentials and that the store is reachable")
    return f"workspace {uri}: {fix} ({said[:300]})"


def _age_seconds(info: pafs.FileInfo) -> float:
    modified = info.mtime
    return float("inf") if modified is None else time.time() - modified.timestamp()


def _commit_name(seq: int) -> str:
    return f"{seq:012d}.json"


# -- create-if-absent, one per store --------------------------------------------------------
def exclusive_writer(fs: pafs.FileSystem, uri: str):
    """``write(path, data) -> bool``: create ``path`` with ``data`` only if it is absent, in
    one step no other writer can interleave with; False where it existed already."""
    if isinstance(fs, pafs.LocalFileSystem):
        return _create_local
    if isinstance(fs, pafs.S3FileSystem):
        return _S3Exclusive(fs, uri)
    if type(fs).__name__ == "GcsFileSystem":
        return _create_gcs
    raise MedcurateError(f"workspace {uri}: {type(fs).__name__} has no create-if-absent write, "
                         "so publishing could not be made safe; use a local path, s3:// or gs://")


def _create_local(path: str, data: bytes) -> bool:
    """Write a temporary file, then ``link`` it to the name: the link fails if the name
    exists, and a reader never sees a partly written commit."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class _S3Exclusive:
    """``PutObject`` with ``If-None-Match: *`` through boto3 (pyarrow has no conditional
    write), aimed at the same endpoint and region as the workspace's pyarrow filesystem."""

    def __init__(self, fs: pafs.S3FileSystem, uri: str):
        self.fs, self.uri = fs, uri
        self._client = None

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            query = {k: v[-1] for k, v in parse_qs(urlsplit(self.uri).query).items()}
            endpoint = query.get("endpoint_override")
            if endpoint and "://" not in endpoint:
                endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
            # A session of its own: boto3's default session keeps the first credentials it
            # found for the life of the process, whatever the environment says later.
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint or None, region_name=self.fs.region or None,
                config=Config(s3={"addressing_style": "path"} if endpoint
                              or os.environ.get("AWS_ENDPOINT_URL") else {},
                              retries={"max_attempts": 3}))
        return self._client

    def __call__(self, path: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        try:
            self.client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise OSError(f"commit to s3://{path} failed: {exc}") from None


def _create_gcs(path: str, data: bytes) -> bool:
    """An upload with generation-match 0 succeeds only where no object of that name exists."""
    try:
        from google.api_core.exceptions import PreconditionFailed
        from google.cloud import storage
    except ImportError:
        raise MedcurateError("a gs:// workspace needs google-cloud-storage for its commits: "
                             "pip install google-cloud-storage") from None
    bucket, key = path.split("/", 1)
    try:
        storage.Client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
        return True
    except PreconditionFailed:
        return False
