"""A dedup as the commands that honour ``--exclude-duplicates`` read it (``select``,
``finetune``, ``compare-selections``): which images it removed and which test images it
found repeating training images, once its provenance shows it describes the images the
command reads.

One reader with one set of checks, so that every consumer refuses the same things: a dedup of
another embedding run (its groups name other images) and a dedup of another version of the run
(re-embedded or overwritten since). ``for_collection`` serves a command that reads a
collection rather than a run (``finetune`` on a collection): the dedup's run must be the live
one, embedded from the collection as it is now.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from medcurate.dedup import GROUPS_FILE, LEAKS_FILE
from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE
from medcurate.provenance import InputRef, input_of, outputs_digest
from medcurate.workspace import Workspace

# The dedup's figures a consumer reports (its summary.json's, as provenance records them).
FIGURES = ("threshold", "keep", "images", "groups", "grouped", "removed", "leaks",
           "leaks_by_split_pair")


@dataclass(frozen=True)
class DedupUse:
    """A checked dedup: its key, its outputs' digest (what provenance names), its figures,
    the ids it removed (in a group, not the group's kept image) and the test ids it reports
    as leaks (``leaks.parquet``'s ``test_id``)."""

    dedup_id: str
    sha256: str
    figures: dict
    removed: pa.Array
    leaked: pa.Array

    def input_ref(self) -> InputRef:
        return InputRef(role="dedup", uri=self.dedup_id, sha256=self.sha256)

    def record(self, **dropped: int) -> dict:
        """What a consumer's summary says of the dedup: key, digest and the counts it dropped."""
        return {"dedup_id": self.dedup_id, "sha256": self.sha256, **dropped}


def in_ids(ids: pa.Array | pa.ChunkedArray, value_set: pa.Array):
    """Bool per id: whether it is in ``value_set`` (numpy)."""
    return pc.is_in(ids, value_set=value_set).to_numpy(zero_copy_only=False)


def read_dedup(workspace: Workspace, dedup_id: str, run_id: str, run_digest: str, *,
               reader: str = "") -> DedupUse:
    """Dedup ``dedup_id``, which must have been made from version ``run_digest`` (outputs
    digest) of embedding run ``run_id``: another run's groups, or another version's, would
    name other images. ``reader`` says who read that version where it is not the live run
    (e.g. "selection 'x'"), for the error message."""
    record = workspace.provenance("dedups", dedup_id)  # NotFound names the known dedups
    run_ref = input_of(record, "embedding_run")
    if run_ref.get("uri") != run_id:
        raise MedcurateError(f"--exclude-duplicates: dedup {dedup_id!r} was made from embedding "
                             f"run {run_ref.get('uri')!r}, not {run_id!r}; run `medcurate "
                             f"dedup {run_id}` and pass its key")
    if run_ref.get("sha256") != run_digest:
        if reader:
            raise MedcurateError(f"--exclude-duplicates: {reader} and dedup {dedup_id!r} read "
                                 f"different versions of embedding run {run_id!r} (it was "
                                 "replaced in between); make them again from the run as it "
                                 "is now")
        raise MedcurateError(f"--exclude-duplicates: embedding run {run_id!r} was replaced "
                             f"since dedup {dedup_id!r} was made from it; run `medcurate dedup "
                             f"{run_id} --overwrite` again")
    folder = workspace.require("dedups", dedup_id)
    groups = workspace.read_table(f"{folder}/{GROUPS_FILE}", columns=["id", "kept"])
    leaks = workspace.read_table(f"{folder}/{LEAKS_FILE}", columns=["test_id"])
    summary = record.get("summary") or {}
    return DedupUse(dedup_id=dedup_id, sha256=outputs_digest(record),
                    figures={k: summary.get(k) for k in FIGURES},
                    removed=groups.filter(pc.invert(groups.column("kept"))).column("id")
                    .combine_chunks(),
                    leaked=pc.unique(leaks.column("test_id")))


def for_collection(workspace: Workspace, dedup_id: str, collection: str) -> DedupUse:
    """Dedup ``dedup_id`` for a command that reads collection ``collection`` by image id:
    the dedup's run must be the live version of a run of this collection, embedded from the
    collection as it is now (a re-ingested collection may give its ids to other images)."""
    run_id = input_of(workspace.provenance("dedups", dedup_id), "embedding_run").get("uri")
    if not run_id or not workspace.exists("embeddings", run_id):
        raise MedcurateError(f"--exclude-duplicates: dedup {dedup_id!r} was made from embedding "
                             f"run {run_id!r}, which is no longer in the workspace; run "
                             "`medcurate dedup` on a run of this collection")
    run = workspace.provenance("embeddings", run_id)
    of = run["summary"]["collection"]
    if of != collection:
        raise MedcurateError(f"--exclude-duplicates: dedup {dedup_id!r} is of collection {of!r} "
                             f"(embedding run {run_id!r}), not {collection!r}; dedup a run of "
                             f"{collection!r} and pass its key")
    embedded = input_of(run, "collection").get("sha256")
    manifest = workspace.provenance("collections", collection)["outputs"][MANIFEST_FILE]
    if embedded != manifest["sha256"]:
        raise MedcurateError(f"--exclude-duplicates: collection {collection!r} was ingested "
                             f"again since embedding run {run_id!r} (which dedup {dedup_id!r} "
                             "grouped) was made; embed and dedup it again")
    return read_dedup(workspace, dedup_id, run_id, outputs_digest(run))
