"""Synthetic embedding runs written straight into a workspace, laid out as ``medcurate embed``
writes them: a collection (manifest and provenance) and an embedding run of shards (id, label,
split, row, embedding) with its provenance, so everything after embedding reads them as usual.

For benchmarks and tests of what comes after embedding (selection, the HTTP service) at sizes
no image archive on a test machine reaches. Nothing in them is an image; the collection says
so (``format: synthetic``), and the run's model is ``synthetic``.

Also ``near_copy``: labelled near-duplicates made from real images (re-encoded, resized,
cropped, mirrored), which the dedup test and ``bench/dedup_threshold.py`` measure recall on.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medcurate.embed import SHARD_DIR, _shard_table, shard_name
from medcurate.ingest import MANIFEST_FILE
from medcurate.provenance import InputRef, OutputRef, Provenance, utc_now
from medcurate.workspace import PROVENANCE_FILE, Workspace

SYNTHETIC_MODEL = "synthetic"


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _output(data: bytes, rows: int | None = None) -> OutputRef:
    return OutputRef(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=rows)


def write_collection(workspace: Workspace, name: str, labels: list[str],
                     metadata: dict[str, list] | None = None) -> str:
    """Publish (or replace) collection ``name`` of ``len(labels)`` image-less rows; returns its manifest's
    sha256."""
    n = len(labels)
    ids = [f"{name}-{i:08d}" for i in range(n)]
    manifest = pa.table({
        "id": ids, "uri": [f"synthetic://{name}/{i}" for i in range(n)],
        "member": pa.nulls(n, pa.string()), "relpath": ids, "label": [str(x) for x in labels],
        "split": ["train"] * n, **{column: pa.array(values)
                                   for column, values in (metadata or {}).items()}})
    data = _parquet_bytes(manifest)
    with workspace.stage("collections", name, overwrite=True) as staging:
        workspace.write_bytes(f"{staging}/{MANIFEST_FILE}", data)
        record = Provenance(
            kind="collection", key=name, started_at=utc_now(), config={"synthetic": True},
            outputs={MANIFEST_FILE: _output(data, n)},
            summary={"collection": name, "format": "synthetic", "ingested": n,
                     "classes": dict(sorted(Counter(map(str, labels)).items()))})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return hashlib.sha256(data).hexdigest()


def write_embedding_run(workspace: Workspace, name: str, X: np.ndarray, labels: list[str],
                        metadata: dict[str, list] | None = None,
                        shard_size: int = 2048) -> str:
    """Collection ``name`` and its embedding run ``<name>--synthetic`` from the [N, D] matrix
    ``X``; returns the run id. Shards are written one at a time and published as the embedding
    pipeline publishes them, so a million-row run never needs a second copy of ``X``."""
    started = utc_now()
    manifest_sha = write_collection(workspace, name, labels, metadata)
    manifest = workspace.read_table(workspace.path("collections", name, MANIFEST_FILE),
                                    columns=["id", "label", "split"])
    run_id = f"{name}--{SYNTHETIC_MODEL}"
    X = np.asarray(X, dtype=np.float32)
    with workspace.stage("embeddings", run_id, overwrite=True) as staging:
        shards = 0
        for index, start in enumerate(range(0, len(X), shard_size)):
            rows = np.arange(start, min(start + shard_size, len(X)))
            workspace.write_table(f"{staging}/{SHARD_DIR}/{shard_name(index)}",
                                  _shard_table(manifest, [{"row": rows, "embedding": X[rows]}],
                                               X.shape[1]))
            shards += 1
        summary = {"run_id": run_id, "collection": name, "model": SYNTHETIC_MODEL,
                   "rows": len(X), "dim": int(X.shape[1]), "shards": shards,
                   "resumed_shards": 0}
        record = Provenance(kind="embedding", key=run_id, started_at=started,
                            config={"collection": name, "model": SYNTHETIC_MODEL},
                            inputs=[InputRef(role="collection", uri=name, sha256=manifest_sha)],
                            summary=summary,
                            model={"spec": SYNTHETIC_MODEL, "embed_dim": int(X.shape[1])})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return run_id


# How an archive comes to hold one picture twice: copied, re-exported at a JPEG quality,
# resized, re-cut (the central 95% of each side) or mirrored.
NEAR_COPY_KINDS = ("exact", "jpeg90", "jpeg50", "resize0.8", "crop5", "flip")


def _reencoded(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).copy()


def near_copy(image: Image.Image, kind: str) -> Image.Image:
    """A copy of ``image`` of one of ``NEAR_COPY_KINDS``."""
    w, h = image.size
    dw, dh = round(0.025 * w), round(0.025 * h)
    kinds = {"exact": image.copy, "jpeg90": lambda: _reencoded(image, 90),
             "jpeg50": lambda: _reencoded(image, 50),
             "resize0.8": lambda: image.resize((round(0.8 * w), round(0.8 * h)),
                                               Image.Resampling.BILINEAR),
             "crop5": lambda: image.crop((dw, dh, w - dw, h - dh)),
             "flip": lambda: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
    if kind not in kinds:
        raise ValueError(f"unknown copy kind {kind!r}; kinds: {', '.join(NEAR_COPY_KINDS)}")
    return kinds[kind]()
