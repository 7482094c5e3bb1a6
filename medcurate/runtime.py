"""Ray start-up and the resources each pipeline stage declares, in one place.

Every stage that runs on Ray names its CPUs, GPUs, batch size and concurrency here (as NeMo
Curator's stages do), so a cluster operator reads one table to size a cluster, and the
2-core deadlock (actors holding every CPU while an upstream read task waits for one) is
avoided by construction: actors take fractional CPUs on CPU-only nodes.

Stages: ``ingest_probe`` (ingest), ``decode`` and ``embed`` (embedding; decode also feeds
training), ``score`` (one task per zoo model), ``train_worker`` (Ray Train workers of finetune
and pretrain), ``umap_transform`` (selection's UMAP transform chunks), ``serve_replica`` (the
HTTP service's Serve deployment) and ``report`` (a selection's report page).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from medcurate.errors import MedcurateError


@dataclass(frozen=True)
class StageResources:
    num_cpus: float
    num_gpus: float = 0.0
    batch_size: int | None = None
    concurrency: int | None = None
    threads: int | None = None  # torch intra-op threads per actor


def gpu_count() -> int:
    """GPUs Ray sees, or torch sees before Ray is up: the single switch for GPU code paths."""
    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def largest_node_cpus() -> int:
    """CPUs of the cluster's largest live node (0 before Ray is up)."""
    if not ray.is_initialized():
        return 0
    return int(max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]),
                   default=0))


def stage_resources(stage: str, batch_size: int | None = None, *,
                    tasks: int = 1) -> StageResources:
    """Resources of one stage given the cluster at hand (CPU-only or with GPUs); ``tasks``:
    how many of the stage's tasks run side by side (the zoo's models, for ``score``)."""
    gpus = gpu_count()
    cpus = max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))) \
        if ray.is_initialized() else (os.cpu_count() or 1)
    if stage == "ingest_probe":
        return StageResources(num_cpus=1, batch_size=batch_size or 64)
    if stage == "decode":
        return StageResources(num_cpus=1, batch_size=batch_size or 64)
    if stage == "embed":
        if gpus:  # one actor per GPU, each fed by CPU decode tasks
            return StageResources(num_cpus=1, num_gpus=1, batch_size=batch_size or 256,
                                  concurrency=gpus)
        # CPU-only: few actors, each running torch on several threads (the model is the
        # bottleneck), but each declaring less than its share so one logical CPU always stays
        # free for the tasks that feed it: no deadlock on a 2-core machine. Where decode and
        # embed declare the same CPUs, Ray Data fuses decode into the actor (no pixel tensors
        # through the object store); with GPUs they differ and decode stays in CPU tasks.
        # An actor lives on one node: size it by the largest node, not the cluster's total
        # (on a head of 1 CPU plus a worker of 2, an actor of 2 CPUs left decode no CPU).
        node = largest_node_cpus() or cpus
        threads = min(8, node)
        actors = max(1, cpus // threads)
        return StageResources(num_cpus=max(0.5, min(threads, node - 1)),
                              batch_size=batch_size or 32, concurrency=actors, threads=threads)
    if stage == "score":
        # One task per zoo model, all at once: each takes an equal share of the CPUs (at
        # least one, at most 8) and runs torch and BLAS on as many threads, and a share of
        # the GPUs. They wait on nothing, so they cannot deadlock.
        share = max(1, min(8, cpus // tasks))
        return StageResources(num_cpus=share, num_gpus=min(1.0, gpus / tasks) if gpus else 0,
                              threads=share)
    if stage == "train_worker":
        # A Ray Train worker (finetune, pretrain): one CPU, and one GPU where the run uses
        # GPUs (``training_gpu``); one more CPU must stay free for the Ray Data tasks that
        # decode its batches.
        return StageResources(num_cpus=1)
    if stage == "umap_transform":  # one chunk of a class's points through a fitted UMAP
        return StageResources(num_cpus=1)
    if stage == "serve_replica":
        # Selections in the request run on the replica's threads under one GIL, with BLAS and
        # OpenMP held to one thread (``threads``): one CPU. On a node of 2 it declares half,
        # so a job's 1-CPU task still fits beside it (else jobs wait on the replica forever).
        # ``concurrency``: requests a replica takes at once (see ``service.app``).
        return StageResources(num_cpus=1.0 if (largest_node_cpus() or cpus) >= 4 else 0.5,
                              concurrency=128, threads=1)
    if stage == "report":  # one selection's report.html: matplotlib and JPEG, one thread
        return StageResources(num_cpus=0.5, threads=1)
    raise ValueError(f"unknown stage {stage!r}")


def this_node() -> str:
    """The Ray node id of the calling task or actor: stages return it with their rows, so a
    run's provenance shows which nodes did its work (``summary["nodes"]``)."""
    return ray.get_runtime_context().get_node_id()


class NodesSeen:
    """Node ids per stage, collected from the ``<stage>_node`` columns that UDFs add."""

    def __init__(self):
        self.stages: dict[str, set[str]] = {}

    def take(self, stage: str, values) -> None:
        self.stages.setdefault(stage, set()).update(str(v) for v in set(values))

    def as_dict(self) -> dict[str, list[str]]:
        return {stage: sorted(nodes) for stage, nodes in sorted(self.stages.items())}


def training_gpu(num_workers: int, use_gpu: bool | None) -> bool:
    """Whether Ray Train workers take GPUs (default: when Ray has one per worker), after
    checking the cluster can hold them: each worker takes its ``train_worker`` CPUs and one
    more must stay free for the Ray Data tasks feeding them, or training waits for data
    forever."""
    gpus = gpu_count()
    if use_gpu and gpus < num_workers:
        raise MedcurateError(f"use_gpu needs {num_workers} GPU(s); Ray has {gpus}")
    cpus = int(ray.cluster_resources().get("CPU", 0))
    needed = num_workers * stage_resources("train_worker").num_cpus + 1
    if cpus < needed:
        raise MedcurateError(f"{num_workers} training worker(s) need at least {needed} "
                             f"CPUs in Ray (one left for decoding); Ray has {cpus}")
    return gpus >= num_workers if use_gpu is None else use_gpu


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local Ray without the dashboard.

    Library use does not need the dashboard (saves about 1 GB); Ray Jobs do, and run under a
    cluster started by ``ray start``. Auth mode defaults to disabled for a local in-process
    Ray; clusters set ``RAY_AUTH_MODE`` themselves (see the README's cluster section).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        quiet_ray_data_console()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",  # never attach to whatever `ray start` left running on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    quiet_ray_data_console()


def quiet_ray_data_console(level: int = logging.ERROR) -> None:
    """Keep Ray Data's chatter off the console; its session log file still gets every line.

    Ray Data logs per-run INFO/WARNING lines ("Progress bars disabled ...", "Dataset ...
    execution finished in ...") to stderr through a stream handler on the ``ray.data`` logger,
    which would interleave with the CLI's own messages. Only the console handler is raised to
    ``level``; the logger level and the file handler (``ray-data.log`` in the Ray session
    folder) are left as Ray configured them, so nothing is lost for debugging.
    """
    import ray.data  # noqa: F401 - importing configures the logger; do it before adjusting

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler):
            handler.setLevel(level)
