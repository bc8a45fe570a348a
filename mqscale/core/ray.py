"""Ray for both trainers and the tokenize stage: the cluster, the Ray Train launch, the Ray session.

Local by default (``ray.init()`` starts a one-node cluster sized for the workers asked), or an
existing cluster via ``ray.address`` or a ``ray job submit`` environment (``RAY_ADDRESS``).
Training runs a Ray Train ``TorchTrainer`` (Train V2) whose storage is the run's storage: a local
directory or an object-store URL, with ``checkpoint.storage_options`` (endpoint, credentials)
reaching Ray through an fsspec-backed pyarrow filesystem. Ray's worker-group restarts
(``ray.max_failures``) resume from the run's own checkpoints (see ``checkpoint.py``).
``ray.num_workers: [min, max]`` makes the run elastic (Ray Train's ``ScalingConfig(num_workers=
(min, max))``): Ray starts as many workers as the cluster has room for, restarts the group smaller
when a worker or node is lost, and larger when room returns (checked every
``ray.resize_interval_s``); each start resumes the newest checkpoint on the new world size.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Train V2 semantics (report(..., checkpoint_dir_name=...), restoring a run by name): the default
# from Ray 2.51 on, which pyproject requires; set here too so an older default can't slip in. It
# is read when ray.train is first imported; the Train controller passes it on to the workers.
os.environ["RAY_TRAIN_V2_ENABLED"] = "1"

import pyarrow.fs as pafs  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
from ray.train import CheckpointConfig as RayCheckpointConfig  # noqa: E402
from ray.train import FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train import LoggingConfig as RayLoggingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from mqscale.core import storage  # noqa: E402
from mqscale.core.checkpoint import CheckpointConfig  # noqa: E402
from mqscale.core.config import setting, to_dict  # noqa: E402
from mqscale.core.console import quiet_frameworks  # noqa: E402
from mqscale.core.errors import RunFailed  # noqa: E402

log = logging.getLogger("mqscale.ray")
SETUP_HOOK = "mqscale.core.console.quiet_frameworks"   # run by Ray in every worker process it starts


@dataclass
class RayConfig:
    """The Ray cluster and the training workers on it."""
    address: str | None = setting(None, doc="Ray cluster address; None starts a local Ray")
    num_workers: int | tuple[int, int] = setting(
        1, ge=1, doc="training workers; [min, max]: elastic, as many as the cluster has room for (Stackformer runs)")
    use_gpu: bool = setting(False)
    cpus_per_worker: float = setting(1.0, gt=0.0)
    resources_per_worker: dict[str, float] = setting({})
    max_failures: int = setting(0, ge=-1, doc="worker-group restarts; -1 = unlimited")
    resize_interval_s: float = setting(60.0, gt=0.0, doc="elastic runs: seconds between Ray's checks for "
                                       "room to grow the worker group")

    def check(self, err) -> None:
        if isinstance(self.num_workers, tuple):
            lo, hi = self.num_workers
            if not 1 <= lo <= hi:
                err("ray.num_workers", f"{list(self.num_workers)} must be [min, max] with 1 <= min <= max")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple) and self.num_workers[0] != self.num_workers[1]

    @property
    def worlds(self) -> range:
        """Every number of workers the run may get."""
        lo, hi = self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers,) * 2
        return range(lo, hi + 1)


def ray_running() -> bool:
    return ray.is_initialized()


def stop_ray() -> None:
    """Shut Ray down (its log monitor prints the workers' last lines first)."""
    ray.shutdown()


def start_ray(address: str | None = None, cpus: float = 0) -> bool:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray with room
    for ``cpus`` (oversubscribing a small machine rather than waiting forever for CPUs it does not
    have). True when this call started or connected it; False when Ray was up already."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_frameworks()
    if not sys.stdout.isatty():   # no colour codes in a log file or a pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address:   # the job's runtime_env (launchers/runtime_env.yaml) names the same setup hook
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return True
    # A local cluster: no preemption watcher (a single machine is never drained, and the watcher's
    # start logs a C++ error line about its constructor arguments)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's placement-group cleaner polls the State API, served by the dashboard, which a
    # local cluster does not run. Given no address, the State API client looks for "the" cluster
    # on the machine, and where two are up (another user's, a leftover `ray start`) it raises and
    # the cleaner's thread dies with a traceback. Naming the API server this cluster lacks makes
    # each poll fail as it does with one cluster: a warning Ray calls harmless (quieted, console.py).
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    # address="local": a new cluster of our own, never the machine's last `ray start` cluster, which
    # ray.init() would otherwise join (and then refuse num_cpus for)
    ray.init(address="local", log_to_driver=True, include_dashboard=False, logging_level=logging.WARNING,
             num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)),
             runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    return True


def ray_storage(path: str, storage_options: dict) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig."""
    if "://" not in path or path.startswith("file://"):
        return str(Path(path.removeprefix("file://")).resolve()), None
    if not storage_options:
        return path, None
    filesystem, stripped = storage.get_fs(path, storage_options)
    return stripped, pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))


def launch(worker_fn: Callable[[dict], None], payload: dict[str, Any], ray_cfg: RayConfig,
           ckpt_cfg: CheckpointConfig, name: str) -> object:
    """Run ``worker_fn(payload)`` on ``ray_cfg.num_workers`` Ray Train workers (a range: elastic);
    returns the Result."""
    worlds = ray_cfg.worlds
    started_here = start_ray(ray_cfg.address, worlds[-1] * ray_cfg.cpus_per_worker)
    path, filesystem = ray_storage(ckpt_cfg.dir, ckpt_cfg.storage_options)
    resources = {"CPU": ray_cfg.cpus_per_worker, **ray_cfg.resources_per_worker}
    n = (worlds[0], worlds[-1]) if ray_cfg.elastic else worlds[0]
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=ray_cfg.resize_interval_s),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             logging_config=RayLoggingConfig(log_level="WARNING"),   # Ray Train's own INFO lines
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             checkpoint_config=RayCheckpointConfig(num_to_keep=ckpt_cfg.keep_last)),
    )
    try:
        return trainer.fit()
    except Exception:
        if started_here:  # flushes the workers' last log lines before the caller prints why
            ray.shutdown()
        raise


def train_on_ray(worker: Callable[..., None], cfg: Any) -> object:
    """Run ``worker(config_dict, run_url=..., launch_id=...)`` on the Ray Train workers of the run
    config ``cfg`` (its ``ray`` and ``checkpoint`` sections, its ``name``); one launch id for the
    launch, shared by every restart of the worker group. Returns Ray's Result; RunFailed with the
    workers' own error line when the run failed (their tracebacks are already in the log)."""
    run = functools.partial(worker, run_url=cfg.checkpoint.run_url(cfg.name), launch_id=uuid.uuid4().hex)
    try:
        return launch(run, to_dict(cfg), cfg.ray, cfg.checkpoint, cfg.name)
    except Exception as e:
        raise RunFailed(failure_line(e)) from e


def failure_line(e: Exception) -> str:
    """The line that says why a run failed: the workers' own error, not Ray's wrapping of it."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


class RaySession:
    """A Ray Train worker's session: rank and device from the worker context; a checkpoint goes
    through ``ray.train.report`` (each rank reports its own files, Ray merges them into
    ``<run>/<name>``). ``between_files(step, rank)``: see ``StorageSession``."""

    def __init__(self, run_url: str, launch_id: str,
                 between_files: Callable[[int, int], None] | None = None):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_url, self.launch_id, self.between_files = run_url, launch_id, between_files

    def commit(self, staging: Path | None, name: str, metrics: dict) -> None:
        if self.between_files is not None:  # (ranks that reported first have uploaded)
            self.between_files(int(metrics.get("step", -1)), self.rank)
        ckpt = ray.train.Checkpoint.from_directory(str(staging)) if staging is not None else None
        ray.train.report({k: v if isinstance(v, str) else float(v) for k, v in metrics.items()},
                         checkpoint=ckpt, checkpoint_dir_name=name)
