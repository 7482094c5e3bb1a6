"""Publish a selection's synthetic images (OptiDEL) as a collection of their own.

``collections/<selection>-synth/`` holds ``images/NNNNNN.png``, a ``manifest.parquet`` with the
columns every collection has (unlabeled, split ``train``, each image's sha256) plus where each
image came from (``base_id``, ``donor_id``, their clusters, the donor's share of the area), and
``provenance.json``. So ``medcurate pretrain --selection`` trains on them, and ``embed`` or
``finetune`` read them, like any ingested archive.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medcurate.errors import MedcurateError
from medcurate.ingest import MANIFEST_FILE
from medcurate.ingest.decode import load_rows
from medcurate.ingest.pipeline import _manifest_batch
from medcurate.provenance import InputRef, OutputRef, Provenance, sha256_bytes, utc_now
from medcurate.select.optidel import SynthesisPlan
from medcurate.workspace import PROVENANCE_FILE, Workspace, validate_key

IMAGE_DIR = "images"


def synthetic_collection_name(selection_id: str) -> str:
    return validate_key(f"{selection_id[:120]}-synth")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def publish_synthetic(workspace: Workspace, name: str, plan: SynthesisPlan, sources: pa.Table,
                      *, selection_id: str, inputs: list[InputRef], params: dict,
                      overwrite: bool) -> dict:
    """Render ``plan`` from the images of ``sources`` (the manifest rows its row numbers index)
    into ``collections/<name>/``; returns the collection's summary. Images are written one
    by one, so memory holds one image at a time, whatever the count."""
    started = utc_now()
    ids = sources.column("id").to_pylist()

    def load(row: int) -> np.ndarray:
        return load_rows(sources.slice(row, 1).to_pydict())[0]

    with workspace.stage("collections", name, overwrite=overwrite) as staging:
        rows, skipped = [], 0
        for index, (pixels, record) in enumerate(plan.render(load)):
            if pixels is None:
                skipped += 1
                continue
            data = _png(pixels)
            relpath = f"{IMAGE_DIR}/{index:06d}.png"
            workspace.write_bytes(f"{staging}/{relpath}", data)
            rows.append({"uri": workspace.location(f"{staging}/{relpath}"),
                         "relpath": relpath, "width": pixels.shape[1],
                         "height": pixels.shape[0],
                         "channels": 1 if pixels.ndim == 2 else pixels.shape[2],
                         "sha256": sha256_bytes(data), "base_id": ids[record["base_row"]],
                         "donor_id": ids[record["donor_row"]],
                         "base_cluster": record["base_cluster"],
                         "donor_cluster": record["donor_cluster"],
                         "donor_share": record["donor_share"]})
        if not rows:
            raise MedcurateError("no image could be synthesised: no donor had a patch above "
                                 "min_content; lower --min-content or set --synth-share 0")
        n = len(rows)
        column = {key: [row[key] for row in rows] for key in rows[0]}
        batch = pa.table({
            "uri": pa.array(column["uri"], pa.string()), "member": pa.nulls(n, pa.string()),
            "relpath": pa.array(column["relpath"], pa.string()),
            "label": pa.nulls(n, pa.string()), "split": pa.array(["train"] * n, pa.string()),
            "width": pa.array(column["width"], pa.int32()),
            "height": pa.array(column["height"], pa.int32()),
            "channels": pa.array(column["channels"], pa.int8()),
            "bit_depth": pa.array([8] * n, pa.int8()),
            "sha256": pa.array(column["sha256"], pa.string()),
            "error": pa.nulls(n, pa.string()),
            "base_id": pa.array(column["base_id"], pa.string()),
            "donor_id": pa.array(column["donor_id"], pa.string()),
            "base_cluster": pa.array(column["base_cluster"], pa.int64()),
            "donor_cluster": pa.array(column["donor_cluster"], pa.int64()),
            "donor_share": pa.array(column["donor_share"], pa.float32())})
        manifest = _manifest_batch(batch, {})  # ids and exact-duplicate links, as at ingest
        sink = pa.BufferOutputStream()
        pq.write_table(manifest, sink)
        data = sink.getvalue().to_pybytes()
        workspace.write_bytes(f"{staging}/{MANIFEST_FILE}", data)
        summary = {"collection": name, "format": "synthetic", "synthesised_by": selection_id,
                   "ingested": n, "skipped": skipped, "classes": {}, "splits": {"train": n}}
        record = Provenance(kind="collection", key=name, started_at=started, seed=plan.seed,
                            config={"synthesised_by": selection_id, **params}, inputs=inputs,
                            outputs={MANIFEST_FILE: OutputRef(sha256=sha256_bytes(data),
                                                              bytes=len(data), rows=n)},
                            summary=summary)
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return summary
