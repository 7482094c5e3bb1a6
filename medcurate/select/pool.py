"""``medcurate optidel``: OptiDEL over an embedding run → ``selections/<id>/`` plus the
collection ``<id>-synth`` of its synthetic images.

The same files as every selection (``selection.parquet``, ``summary.json``, ``report.html``,
provenance; ``medcurate.select.run`` publishes them), so ``medcurate pretrain --selection``
trains on the picks and their synthetic images alike.
"""

from __future__ import annotations

import time

from medcurate.config import OptidelConfig
from medcurate.provenance import utc_now
from medcurate.select.optidel import optidel
from medcurate.select.run import (InputsCache, Selection, SelectionInputs, assemble, begin,
                                  publish)
from medcurate.select.synthesis import publish_synthetic, synthetic_collection_name
from medcurate.workspace import Workspace


def compute(config: OptidelConfig, data: SelectionInputs, selection_id: str, *,
            timing: dict | None = None) -> Selection:
    """OptiDEL's picks among ``data`` (labels ignored) and its plan of synthetic images
    (``selection.result.synthesis``), written nowhere."""
    timing = dict(timing or {})
    clock = time.perf_counter()
    result = optidel(data.X, data.labels, None, seed=config.seed, **config.strategy_params())
    timing["select_s"] = round(time.perf_counter() - clock, 3)
    selection = assemble(config, data, selection_id, result, timing=timing)
    selection.summary.update(fraction=config.fraction,
                             pretraining_images=int(selection.selected.sum()))
    return selection


def run_optidel(config: OptidelConfig, workspace: Workspace | None = None, *,
                inputs: InputsCache | None = None) -> dict:
    """Select ``config.fraction`` of the run's pool and publish the selection and its
    synthetic collection; returns the selection's summary."""
    workspace = workspace or Workspace()
    started = utc_now()
    data, selection_id, timing = begin(config, workspace, inputs)
    selection = compute(config, data, selection_id, timing=timing)
    if selection.result.synthesis is not None:
        synthetic = synthetic_collection_name(selection_id)
        made = publish_synthetic(workspace, synthetic, selection.result.synthesis, data.metadata,
                                 selection_id=selection_id, inputs=selection.inputs,
                                 params=config.strategy_params(), overwrite=config.overwrite)
        selection.summary.update(synthetic_collection=synthetic, synthesised=made["ingested"],
                                 pretraining_images=int(selection.selected.sum())
                                 + made["ingested"])
    return publish(workspace, config, data, selection, started=started, report=True)
