"""Start a Ray Train ``TorchTrainer`` for a training loop, from the run config's ``ray`` section.

Local by default (``ray.init()`` starts a one-node cluster with as many workers as asked), or an
existing cluster via ``ray.address`` or a ``ray job submit`` environment. Storage: a local
directory or an object-store URL; ``checkpoint.storage_options`` (endpoint, credentials) reach
Ray through an fsspec-backed pyarrow filesystem.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable

from mqscale.config import CheckpointConfig, RayConfig

log = logging.getLogger("mqscale.ray")


def absolute(path: str) -> str:
    """Ray workers run in their own directories: local paths must not be relative."""
    return path if not path or "://" in path else str(Path(path).resolve())


def storage(path: str, storage_options: dict) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for RunConfig."""
    if "://" not in path or path.startswith("file://"):
        return str(Path(path.removeprefix("file://")).resolve()), None
    if not storage_options:
        return path, None
    import pyarrow.fs as pafs

    from mqscale.data.fs import get_fs
    fs, stripped = get_fs(path, storage_options)
    return stripped, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def launch(worker_fn: Callable[[dict], None], config: dict, ray_cfg: RayConfig, ckpt_cfg: CheckpointConfig,
           name: str) -> object:
    """Run ``worker_fn(config)`` on ``ray_cfg.num_workers`` Ray Train workers; returns the Result."""
    # Train V2 semantics (report(..., checkpoint_dir_name=...), restoring a run by name): the default
    # from Ray 2.51 on, which pyproject requires; set here too so an older default can't slip in.
    # Read when ray.train is first imported; the Train controller passes it on to the workers.
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    import ray
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_here = not ray.is_initialized()
    if started_here:
        address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
        # a local Ray gets room for every worker the config asks for (oversubscribing a small
        # machine rather than waiting forever for CPUs it does not have)
        need = math.ceil(ray_cfg.num_workers * ray_cfg.cpus_per_worker)
        local = {} if address else {"num_cpus": max(os.cpu_count() or 1, need)}
        ray.init(address=address, log_to_driver=True, include_dashboard=False if not address else None, **local)
    path, filesystem = storage(ckpt_cfg.dir, ckpt_cfg.storage_options)
    resources = {"CPU": ray_cfg.cpus_per_worker, **ray_cfg.resources_per_worker}
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             checkpoint_config=RayCheckpointConfig(num_to_keep=ckpt_cfg.keep_last)),
    )
    try:
        return trainer.fit()
    except Exception:
        if started_here:  # flushes the workers' last log lines before the caller prints why
            ray.shutdown()
        raise


def failure_line(e: Exception) -> str:
    """The line that says why a run failed: the workers' own error, not Ray's wrapping of it."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
