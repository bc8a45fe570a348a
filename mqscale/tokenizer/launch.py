"""A tokenizer run under Ray Train: checked before any worker starts, trained, and found afterwards.

``train_on_ray(cfg)`` is what ``python -m mqscale.train_tokenizer`` and the main job call: it
returns where the run is and its newest verified checkpoint (a complete tokenizer export), or
raises a library error (a bad config, unreadable shards: before any worker; ``RunFailed`` when
the workers failed).
"""
from __future__ import annotations

from dataclasses import dataclass

from mqscale.core.checkpoint import CheckpointStore, check_resumable
from mqscale.core.config import absolutize_paths, from_dict
from mqscale.core.console import setup_logging
from mqscale.core.errors import ConfigError
from mqscale.core.ray import RaySession
from mqscale.core.ray import train_on_ray as run_workers
from mqscale.data.loader import resolve_source
from mqscale.tokenizer.config import TokenizerRunConfig
from mqscale.tokenizer.trainer import train_tokenizer


@dataclass
class TokenizerRun:
    run_url: str
    checkpoint: str | None   # the newest verified checkpoint: usable as --tokenizer
    images: int              # in the training shards


def worker(config: dict, run_url: str, launch_id: str) -> None:
    """Runs on every Ray Train worker (again after a worker-group restart, with the same launch_id)."""
    setup_logging()
    cfg = from_dict(config, "train_loop_config", TokenizerRunConfig)
    train_tokenizer(cfg, RaySession(run_url, launch_id))


def train_on_ray(cfg: TokenizerRunConfig) -> TokenizerRun:
    if not cfg.data.train_url:
        raise ConfigError("data.train_url: empty; point it at image shards (e.g. from data_tools.make_shapes)")
    src = resolve_source(cfg.data.train_url, "images", cfg.data.storage_options)  # fail here, not in a worker
    if isinstance(cfg.ray.num_workers, tuple):
        raise ConfigError(f"ray.num_workers: {list(cfg.ray.num_workers)} is elastic, which Stackformer training "
                          "is; tokenizer training takes one number of workers")
    check_resumable(cfg.checkpoint, cfg.checkpoint.run_url(cfg.name), cfg.ray.num_workers)
    absolutize_paths(cfg)
    run_workers(worker, cfg)
    run_url = cfg.checkpoint.run_url(cfg.name)
    newest = CheckpointStore(run_url, cfg.checkpoint.storage_options).latest_valid()
    return TokenizerRun(run_url, newest.url if newest else None, src.total)
