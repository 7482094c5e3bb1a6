"""The per-model work of ``medcurate score``, fanned out as one Ray task per zoo model.

Each task loads the model and its features of the probe, and computes every requested
per-model value: the feature metrics, the source-prediction metrics (from the model's own
classifier head where it has one) and FU (one backward pass per batch of probe images). The
tasks declare the ``score`` resources (``runtime``), so on a 2-core machine two models run at
a time, each on as many torch and BLAS threads as it declares.
"""

from __future__ import annotations

import functools
import sys
import time

import numpy as np
import ray
import torch
from threadpoolctl import threadpool_limits

from medcurate.embed import load_embeddings
from medcurate.ingest.decode import decode_preprocess
from medcurate.models import create_encoder, fu_layers
from medcurate.runtime import ensure_ray, stage_resources
from medcurate.transfer import metrics as m
from medcurate.transfer.paper import fu_score
from medcurate.transfer.registry import METRICS, Metric, Request
from medcurate.transfer.zoo import ZooEntry, source_classifier
from medcurate.workspace import Workspace

NO_SOURCE = "n/a: needs source-task predictions (the model has no classifier head)"


def score_models(zoo: list[ZooEntry], workspace: Workspace, runs: dict[str, str],
                 image_rows: dict, requests: list[Request]) -> dict[str, dict]:
    """``score_model`` of every zoo model, one Ray task each, by model name. The tasks wait
    on nothing, so they cannot deadlock; a failure is not retried (it would fail again)."""
    ensure_ray()
    resources = stage_resources("score", tasks=len(zoo))
    task = ray.remote(score_model).options(num_cpus=resources.num_cpus,
                                           num_gpus=resources.num_gpus, max_retries=0)
    pending = {task.remote(entry, workspace.worker_root, runs[entry.name], image_rows, requests,
                           resources.threads):
               entry.name for entry in zoo}
    results = {}
    while pending:
        (done,), _ = ray.wait(list(pending))
        name = pending.pop(done)
        results[name] = ray.get(done)
        print(f"scored {name} in {sum(results[name]['timing_s'].values()):.1f} s",
              file=sys.stderr)
    return results


def score_model(entry: ZooEntry, workspace_uri: str, run_id: str, image_rows: dict,
                requests: list[Request], threads: int) -> dict:
    """Every requested per-model value for one zoo model: ``{"values", "notes", "timing_s"}``.
    NCTI comes back as its three terms (``ncti-terms``), combined across the zoo later."""
    torch.set_num_threads(threads)
    rows, features = load_embeddings(Workspace(workspace_uri), run_id)
    labels = np.array(rows.column("label").to_pylist(), dtype=object).astype(str)
    encoder = create_encoder(entry.model, weights=entry.weights, workspace=workspace_uri)
    if torch.cuda.is_available():
        encoder = encoder.to("cuda")

    @functools.cache
    def source_probs() -> np.ndarray | None:
        head = source_classifier(encoder)
        return None if head is None else m.softmax(features.astype(np.float64) @ head[0].T
                                                   + head[1])

    def fu(variant: str) -> float:
        pixels = decode_preprocess(image_rows, encoder.preprocessing)
        return fu_score(encoder.backbone, *fu_layers(encoder),
                        lambda idx: torch.from_numpy(pixels[idx]), labels,
                        embeddings=features, relative=variant == "relative")

    values, notes, timing = {}, {}, {}
    with threadpool_limits(threads):
        for request in requests:
            metric = METRICS[request.name]
            key = "ncti-terms" if request.name == "ncti" else request.column
            if key in values:  # NCTI's terms serve every NCTI variant
                continue
            started = time.monotonic()
            try:
                if metric.needs == "images":
                    values[key] = fu(request.variant)
                elif metric.needs == "source" and source_probs() is None:
                    values[key], notes[key] = None, NO_SOURCE
                elif metric.needs == "source":
                    values[key] = _call(metric, source_probs(), labels, request.variant)
                elif request.name == "ncti":
                    values[key] = list(metric.compute(features, labels))
                else:
                    values[key] = _call(metric, features, labels, request.variant)
            except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
                values[key], notes[key] = None, f"failed: {type(exc).__name__}: {exc}"
            timing[key] = round(time.monotonic() - started, 3)
    return {"values": values, "notes": notes, "timing_s": timing,
            "embed_dim": int(features.shape[1]), "probe_size": int(len(labels))}


def _call(metric: Metric, matrix: np.ndarray, labels: np.ndarray, variant: str | None) -> float:
    kwargs = {"variant": variant} if metric.variants else {}
    return float(metric.compute(matrix, labels, **kwargs))
