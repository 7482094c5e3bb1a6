"""The probe ``medcurate score`` measures a zoo on: a class-stratified, seeded sample of the
target's training images, published as its own collection (``ensure_probe``) so every model's
features of it are cached like any embedding run. ``ensure_subset`` publishes any rows of a
collection that way (the transfer study's fixed test sets use it too).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medcurate.ingest import MANIFEST_FILE
from medcurate.provenance import InputRef, OutputRef, Provenance, sha256_bytes, utc_now
from medcurate.workspace import PROVENANCE_FILE, Workspace, validate_key


def probe_indices(labels: list, splits: list, per_class: int, seed: int) -> np.ndarray:
    """Manifest rows of the probe: ``per_class`` training images of each class (all of a
    smaller class), drawn with ``seed``, in a seeded random order so that FU's unshuffled
    batches mix the classes even where the archive lists them class by class."""
    labels, splits = np.array(labels, dtype=object), np.array(splits, dtype=object)
    usable = np.array([label is not None for label in labels])
    if (splits == "train").any():
        usable &= splits == "train"
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(set(labels[usable].tolist()), key=str):
        rows = np.flatnonzero(usable & (labels == label))
        chosen.append(rng.choice(rows, size=min(per_class, rows.size), replace=False))
    picked = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return rng.permutation(np.sort(picked))


def ensure_probe(workspace: Workspace, target: str, manifest: pa.Table, manifest_sha: str,
                 indices: np.ndarray, per_class: int, seed: int) -> str:
    """Publish the probe as collection ``<target>--probe<k>-s<seed>-<hash>`` (reused if there)."""
    name = validate_key(f"{target}--probe{per_class}-s{seed}-{manifest_sha[:8]}")
    return ensure_subset(workspace, target, manifest, manifest_sha, indices, name,
                         {"probe_of": target, "per_class": per_class, "seed": seed}, seed,
                         kind="probe")


def ensure_subset(workspace: Workspace, source: str, manifest: pa.Table, manifest_sha: str,
                  indices: np.ndarray, name: str, config: dict, seed: int | None = None,
                  kind: str = "subset") -> str:
    """Publish rows ``indices`` of a collection's manifest as collection ``name`` (reused if
    there), so they embed and cache like any collection; ``config`` says how they were drawn."""
    if workspace.exists("collections", name):
        return name
    subset = manifest.take(pa.array(indices))
    sink = pa.BufferOutputStream()
    pq.write_table(subset, sink)
    data = sink.getvalue().to_pybytes()
    classes = Counter(subset.column("label").to_pylist())
    with workspace.stage("collections", name) as staging:
        workspace.write_bytes(f"{staging}/{MANIFEST_FILE}", data)
        record = Provenance(
            kind="collection", key=name, started_at=utc_now(), seed=seed, config=config,
            inputs=[InputRef(role="collection", uri=source, sha256=manifest_sha)],
            outputs={MANIFEST_FILE: OutputRef(sha256=sha256_bytes(data), bytes=len(data),
                                              rows=subset.num_rows)},
            summary={"collection": name, "format": kind, **config,
                     "ingested": subset.num_rows,
                     "classes": {str(k): v for k, v in sorted(classes.items(), key=str)}})
        workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
    return name
