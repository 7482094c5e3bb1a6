"""One Ray Train run, as finetune and pretrain start it: a ``TorchTrainer`` whose workers
declare the ``train_worker`` resources (``runtime``), checkpoints in the workspace's scratch
storage (one kept), and the file rank 0 saved in its last checkpoint read back on the driver.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import ray.train
import ray.train.torch
import torch

from medcurate.errors import MedcurateError
from medcurate.runtime import stage_resources
from medcurate.workspace import Scratch


def fit_on_ray(train_loop: Callable[[dict], None], loop: dict, datasets: dict, *,
               num_workers: int, use_gpu: bool, storage: Scratch, name: str, result_file: str,
               what: str, dataset_config: ray.train.DataConfig | None = None,
               weights_only: bool = True) -> dict:
    """Run ``train_loop(loop)`` on ``num_workers`` workers over ``datasets``; returns what the
    last checkpoint's ``result_file`` holds (``torch.load`` on the CPU).

    The run is ``name`` under ``storage``: Ray Train resumes a run of the same name from its
    checkpoint (pretrain's crash recovery). ``what`` names the run in the error raised where
    it ends without a checkpoint. ``weights_only=False`` where the file holds more than
    tensors and plain containers (finetune's numpy predictions)."""
    worker = stage_resources("train_worker")
    trainer = ray.train.torch.TorchTrainer(
        train_loop, train_loop_config=loop, datasets=datasets, dataset_config=dataset_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": worker.num_cpus}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage.path,
                                       storage_filesystem=storage.ray_filesystem,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise MedcurateError(f"{what} run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, result_file), map_location="cpu",
                          weights_only=weights_only)
