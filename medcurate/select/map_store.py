"""Class maps stored beside their embedding run: UMAP once per (rows, parameters, seed).

A confounder-aware selection spends nearly all its time on each class's 2-D map (PCA + UMAP)
and its clustering; the budget and the picks are milliseconds. The map depends only on the
class's embeddings, the map parameters and the map's seed, so ``WorkspaceMaps`` stores each
one as an artefact ``maps/<run>-<digest>`` (``map.parquet``: x, y, group per row of the
class; provenance: the parameters and the clustering's info) under the workspace's publish
protocol, and a later selection with another budget or seed reads it back instead.

The digest covers the class's embedding bytes, not the run's name: an overwritten run, a
``--splits`` subset or a stratum cell holds other rows and so gets its own map, and a map is
never served for rows it was not made from.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from medcurate.errors import AlreadyExists
from medcurate.provenance import InputRef, Provenance, json_ready, utc_now
from medcurate.select.confounder import ClassMap
from medcurate.workspace import PROVENANCE_FILE, Workspace

MAP_FILE = "map.parquet"
DIGEST_CHARS = 32  # of the key; with a run id of at most 95 characters a key stays <= 128


def map_digest(Xc: np.ndarray, params: dict) -> str:
    """sha256 over the class's float32 rows and the map's parameters (seed included)."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    digest.update(str(Xc.shape).encode())
    digest.update(np.ascontiguousarray(Xc, dtype=np.float32).data)
    return digest.hexdigest()


class WorkspaceMaps:
    """A ``MapStore`` (see ``medcurate.select.confounder``) over one run's stored maps.

    Counts what it reused and computed (``reused``, ``computed``: map keys), for the
    selection's summary and provenance. A map computed by two selections at once is
    published by the first; the second's identical map is dropped (``AlreadyExists``)."""

    def __init__(self, workspace: Workspace, run_id: str, run_digest: str):
        self.workspace, self.run_id, self.run_digest = workspace, run_id, run_digest
        self.reused: list[str] = []
        self.computed: list[str] = []

    def __call__(self, Xc: np.ndarray, params: dict, compute) -> ClassMap:
        key = f"{self.run_id[:95]}-{map_digest(Xc, params)[:DIGEST_CHARS]}"
        if self.workspace.exists("maps", key):
            table = self.workspace.read_table(self.workspace.path("maps", key, MAP_FILE))
            info = self.workspace.provenance("maps", key)["summary"]["info"]
            self.reused.append(key)
            return (np.column_stack([table.column("x").to_numpy(),
                                     table.column("y").to_numpy()]).astype(np.float32),
                    table.column("group").to_numpy().astype(np.int64), info)
        started = utc_now()
        coords, groups, info = compute()
        info = json_ready(info)  # what a reuse reads back: both paths give the same info
        try:
            with self.workspace.stage("maps", key) as staging:
                self.workspace.write_table(f"{staging}/{MAP_FILE}", pa.table({
                    "x": pa.array(coords[:, 0], pa.float32()),
                    "y": pa.array(coords[:, 1], pa.float32()),
                    "group": pa.array(groups, pa.int64())}))
                record = Provenance(kind="map", key=key, started_at=started,
                                    config=json_ready(params), seed=params.get("seed"),
                                    inputs=[InputRef(role="embedding_run", uri=self.run_id,
                                                     sha256=self.run_digest)],
                                    summary={"rows": int(len(Xc)), "info": info})
                self.workspace.write_json(f"{staging}/{PROVENANCE_FILE}", record.model_dump())
        except AlreadyExists:
            pass
        self.computed.append(key)
        return coords, groups, info

    def as_dict(self) -> dict:
        return {"reused": list(self.reused), "computed": list(self.computed)}
