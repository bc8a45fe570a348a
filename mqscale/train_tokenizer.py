"""python -m mqscale.train_tokenizer --config configs/mqvae/<name>.yaml [section.key=value ...]

Trains the MQ-VAE under Ray Train: ``ray.num_workers`` workers (a local Ray, or the cluster at
``ray.address`` / under ``ray job submit``), image shards streamed from ``data.train_url``,
checkpoints (each a complete tokenizer export) in ``checkpoint.dir/<name>``, resumed
automatically (``checkpoint.resume=never`` starts over), and TensorBoard logs in
``logging.tensorboard_dir`` (default: ``checkpoint.dir/<name>/tb``).
"""
from __future__ import annotations

import argparse
import functools
import logging
import uuid

from mqscale.cli import add_config_args, config_from_args, guarded
from mqscale.config import to_dict
from mqscale.tokenizer_config import TokenizerRunConfig


def worker(config: dict, launch_id: str = "") -> None:
    """Runs on every Ray Train worker (again after a worker-group restart, with the same launch_id)."""
    from mqscale.config import from_dict
    from mqscale.train.ray_session import RaySession
    from mqscale.train.tokenizer_trainer import train_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = from_dict(config, "train_loop_config", root=TokenizerRunConfig)
    train_tokenizer(cfg, RaySession(), launch_id)


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default="configs/mqvae/debug.yaml")
    ns = p.parse_args(argv)
    cfg = config_from_args(ns, TokenizerRunConfig)
    from mqscale.cli import UserError
    if not cfg.data.train_url:
        raise UserError("data.train_url is empty: point it at image shards (e.g. from data_tools.make_shapes)")
    from mqscale.data.loader import resolve_source
    src = resolve_source(cfg.data.train_url, "images", cfg.data.storage_options)  # fail here, not in a worker
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from mqscale.train.ray_launch import absolute, failure_line, launch
    cfg.data.train_url = absolute(cfg.data.train_url)
    cfg.logging.tensorboard_dir = absolute(cfg.logging.tensorboard_dir)
    cfg.checkpoint.dir = absolute(cfg.checkpoint.dir)  # workers derive the default tb dir from it
    cfg.loss.vgg_weights, cfg.loss.lpips_weights = absolute(cfg.loss.vgg_weights), absolute(cfg.loss.lpips_weights)
    try:
        result = launch(functools.partial(worker, launch_id=uuid.uuid4().hex), to_dict(cfg), cfg.ray,
                        cfg.checkpoint, cfg.name)
    except Exception as e:  # the workers' traceback is already in the log above
        print(f"training failed: {failure_line(e)}")
        return 1
    ckpt = getattr(result, "checkpoint", None)
    print(f"trained {cfg.name} on {src.total} images; tokenizer checkpoint: {ckpt.path if ckpt else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
