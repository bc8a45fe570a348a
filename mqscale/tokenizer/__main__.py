"""python -m mqscale.train_tokenizer --config configs/mqvae/<name>.yaml [section.key=value ...]

Trains the MQ-VAE under Ray Train: ``ray.num_workers`` workers (a local Ray, or the cluster at
``ray.address`` / under ``ray job submit``), image shards streamed from ``data.train_url``,
checkpoints (each a complete tokenizer export) in ``checkpoint.dir/<name>``, resumed
automatically (``checkpoint.resume=never`` starts over), and TensorBoard logs in
``logging.tensorboard_dir`` (default: ``checkpoint.dir/<name>/tb``).
"""
from __future__ import annotations

import argparse
import sys

from mqscale.core.cli import add_config_args, config_from_args, guarded
from mqscale.core.console import setup_logging
from mqscale.core.errors import RunFailed
from mqscale.tokenizer.config import TokenizerRunConfig
from mqscale.tokenizer.launch import train_on_ray


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default="configs/mqvae/debug.yaml")
    ns = p.parse_args(argv)
    cfg = config_from_args(ns, TokenizerRunConfig)
    setup_logging()
    try:
        run = train_on_ray(cfg)
    except RunFailed as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    print(f"trained {cfg.name} on {run.images} images; tokenizer checkpoint: {run.checkpoint or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
