"""Ingest: list an archive, probe every image on Ray Data, write a collection manifest.

Probing (fetch, sha256, full decode, shape) runs in Ray Data CPU tasks; the driver only
streams probed rows into two Parquet writers, so memory stays bounded by the listing (paths
and metadata) plus one batch, whatever the archive's size.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from medcurate.config import IngestConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import dicom
from medcurate.ingest.decode import ImageError, probe
from medcurate.ingest.sources import Listing, list_source
from medcurate.provenance import OutputRef, Provenance, utc_now
from medcurate.runtime import NodesSeen, ensure_ray, stage_resources, this_node
from medcurate.workspace import PROVENANCE_FILE, Workspace

MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"
REJECTS_SCHEMA = pa.schema([("uri", pa.string()), ("member", pa.string()),
                            ("reason", pa.string())])
NODE_COLUMN = "ingest_probe_node"  # which node probed a row; dropped before the manifest
_PROBE_COLUMNS = [("width", pa.int32()), ("height", pa.int32()), ("channels", pa.int8()),
                  ("bit_depth", pa.int8()), ("sha256", pa.string()), ("error", pa.string())]
_DICOM_COLUMNS = [(f, pa.string()) for f in dicom.CONFOUNDER_FIELDS] + [
    ("window_center", pa.float64()), ("window_width", pa.float64())]


def image_id(relpath: str, sha256: str) -> str:
    """Stable id from content and place: the same archive gives the same ids anywhere, and
    exact duplicates at two places stay two rows (flagged by ``duplicate_of``)."""
    return hashlib.sha256(f"{sha256}\0{relpath}".encode()).hexdigest()[:32]


class _ProbeBatch:
    """Ray Data UDF: adds the probe columns (and DICOM header columns) to a batch of items."""

    def __init__(self, window: tuple[float, float] | None, min_side: int, with_dicom: bool):
        self.window, self.min_side, self.with_dicom = window, min_side, with_dicom

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = _PROBE_COLUMNS + (_DICOM_COLUMNS if self.with_dicom else [])
        values = {name: [] for name, _ in columns}
        for uri, member in zip(batch.column("uri").to_pylist(), batch.column("member").to_pylist()):
            try:
                info = probe(uri, member, self.window, self.min_side)
                row = {"width": info.width, "height": info.height, "channels": info.channels,
                       "bit_depth": info.bit_depth, "sha256": info.sha256, "error": None,
                       **info.extra}
            except ImageError as exc:
                row = {"error": str(exc)}
            for name, _ in columns:
                values[name].append(row.get(name))
        for name, kind in columns:
            batch = batch.append_column(name, pa.array(values[name], kind))
        return batch.append_column(NODE_COLUMN, pa.array([this_node()] * batch.num_rows))


def _manifest_batch(batch: pa.Table, seen: dict[bytes, str]) -> pa.Table:
    """Accepted rows in manifest column order, with ids and exact-duplicate links."""
    ids, duplicates = [], []
    for relpath, digest in zip(batch.column("relpath").to_pylist(),
                               batch.column("sha256").to_pylist()):
        row_id = image_id(relpath, digest)
        ids.append(row_id)
        first = seen.setdefault(bytes.fromhex(digest), row_id)
        duplicates.append(None if first == row_id else first)
    batch = batch.drop_columns(["error"])
    batch = batch.append_column("id", pa.array(ids, pa.string()))
    batch = batch.append_column("duplicate_of", pa.array(duplicates, pa.string()))
    first = ["id", "uri", "member", "relpath", "label", "split", "width", "height", "channels",
             "bit_depth", "sha256", "duplicate_of"]
    return batch.select(first + [c for c in batch.column_names if c not in first])


def _probe_dataset(listing: Listing, config: IngestConfig, window) -> ray.data.Dataset:
    resources = stage_resources("ingest_probe")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    block_rows = max(resources.batch_size, min(1024, listing.items.num_rows // 16 or 1))
    blocks = [listing.items.slice(i, block_rows)
              for i in range(0, listing.items.num_rows, block_rows)]
    return ray.data.from_arrow(blocks).map_batches(
        _ProbeBatch(window, config.min_side, listing.format == "dicom"),
        batch_format="pyarrow", batch_size=resources.batch_size, num_cpus=resources.num_cpus,
    )


def ingest(config: IngestConfig, workspace: Workspace | None = None) -> dict:
    """Ingest ``config.source`` into ``collections/<name>/``; returns the run's summary."""
    workspace = workspace or Workspace()
    started = utc_now()
    window = dicom.parse_window(config.window)
    workspace.existing("collections", config.name, config.overwrite)
    listing = list_source(config)
    with workspace.stage("collections", config.name, overwrite=config.overwrite) as staging:
        writers: list[pq.ParquetWriter] = []
        try:
            rejects = pq.ParquetWriter(f"{staging}/{REJECTS_FILE}", REJECTS_SCHEMA,
                                       filesystem=workspace.fs)
            writers.append(rejects)
            if listing.rejects:
                rejects.write_table(pa.Table.from_pylist(listing.rejects, REJECTS_SCHEMA))
            reasons = Counter(r["reason"] for r in listing.rejects)
            manifest, seen = None, {}
            labels, splits, duplicates = Counter(), Counter(), 0
            content = hashlib.sha256()  # the archive's content hash, over (relpath, sha256) rows
            nodes = NodesSeen()
            if listing.items.num_rows:
                ensure_ray()
                progress = tqdm(total=listing.items.num_rows, desc=f"ingest {config.name}",
                                unit="img", file=sys.stderr, disable=None)
                for batch in _probe_dataset(listing, config, window).iter_batches(
                        batch_format="pyarrow", batch_size=None):
                    nodes.take("ingest_probe", batch.column(NODE_COLUMN).unique().to_pylist())
                    batch = batch.drop_columns([NODE_COLUMN])
                    failed = pc.is_valid(batch.column("error"))
                    bad = batch.filter(failed)
                    if bad.num_rows:
                        rejects.write_table(bad.select(["uri", "member"]).append_column(
                            "reason", bad.column("error")).cast(REJECTS_SCHEMA))
                        reasons.update(bad.column("error").to_pylist())
                    good = _manifest_batch(batch.filter(pc.invert(failed)), seen)
                    if good.num_rows:
                        if manifest is None:
                            manifest = pq.ParquetWriter(f"{staging}/{MANIFEST_FILE}",
                                                        good.schema, filesystem=workspace.fs)
                            writers.append(manifest)
                        manifest.write_table(good.cast(manifest.schema))
                        labels.update(good.column("label").to_pylist())
                        splits.update(good.column("split").to_pylist())
                        duplicates += good.num_rows - pc.sum(pc.is_null(good.column("duplicate_of"))).as_py()
                        for relpath, digest in zip(good.column("relpath").to_pylist(),
                                                   good.column("sha256").to_pylist()):
                            content.update(f"{relpath}\0{digest}\0".encode())
                    progress.update(batch.num_rows)
                progress.close()
            rejects.close()
            rejected = sum(reasons.values())
            if manifest is None:
                top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
                raise MedcurateError(f"source {config.source} holds no usable image "
                                     f"({rejected} rejected: {top or 'none found'})")
            manifest.close()
            summary = {
                "collection": config.name, "format": listing.format,
                "ingested": sum(labels.values()), "rejected": rejected,
                "exact_duplicates": duplicates,
                "classes": {str(k): v for k, v in sorted(labels.items(), key=lambda kv: str(kv[0]))},
                "splits": {str(k): v for k, v in sorted(splits.items(), key=lambda kv: str(kv[0]))},
                "reject_reasons": dict(reasons.most_common(20)),
                "nodes": nodes.as_dict(),
            }
            inputs = listing.inputs
            if inputs[0].role == "source" and inputs[0].sha256 is None:
                inputs[0].sha256 = content.hexdigest()
            outputs = {name: _output_ref(workspace, f"{staging}/{name}")
                       for name in (MANIFEST_FILE, REJECTS_FILE)}
            # Without confine_to: the service's roots are not for every reader of provenance.
            record = Provenance(kind="collection", key=config.name, started_at=started,
                                config=config.model_dump(exclude={"confine_to"}), inputs=inputs,
                                outputs=outputs, summary=summary)
            workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
        except BaseException:
            _close_quietly(writers)
            raise
    return summary


def _close_quietly(writers: list[pq.ParquetWriter]) -> None:
    """Close streaming writers on an error path. An object store's failed upload left to the
    writer's finaliser can hang the process at exit; the draft is deleted anyway."""
    for writer in writers:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the error that got us here is the one to report
            pass


def _output_ref(workspace: Workspace, path: str) -> OutputRef:
    with workspace.fs.open_input_file(path) as handle:
        data = handle.read()
    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    return OutputRef(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=rows)


def read_manifest(workspace: Workspace, name: str, columns: list[str] | None = None) -> pa.Table:
    """The manifest of a complete collection (a clear error when there is none)."""
    return workspace.read_table(f"{workspace.require('collections', name)}/{MANIFEST_FILE}",
                                columns=columns)
