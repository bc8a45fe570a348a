"""python -m mqscale.train [--config CONFIG] [section.key=value ...] [--launcher ray|deepspeed]

With Ray (default): a Ray Train TorchTrainer with ``ray.num_workers`` DeepSpeed workers, on a
local Ray, the cluster at ``ray.address``, or under ``ray job submit``. With ``--launcher
deepspeed`` (run by ``deepspeed --hostfile H -m mqscale.train ...``): the same loop in the
processes the launcher starts. With no --config: the main job, configs/demo.yaml, which first
builds its demo token shards and tokenizer when they are missing (see ``mqscale/demo.py``).
"""
from __future__ import annotations

import argparse
import sys

from mqscale.core import dist
from mqscale.core.cli import UserError, add_config_args, config_from_args, guarded
from mqscale.core.config import absolutize_paths
from mqscale.core.console import setup_logging
from mqscale.core.errors import RunFailed
from mqscale.demo import DemoData, ensure_demo_data
from mqscale.train.config import Config
from mqscale.train.launch import report_lines, train_with_launcher, train_with_ray

DEMO = "configs/demo.yaml"


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default=None)
    p.add_argument("--launcher", choices=["ray", "deepspeed"], default="ray")
    p.add_argument("--resume-from", default="", help="a checkpoint URL to resume from (verified)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("the main job (no --config)")
    g.add_argument("--demo-images", type=int, default=DemoData.images, help="shapes images to build")
    g.add_argument("--demo-tokenizer-steps", type=int, default=DemoData.tokenizer_steps,
                   help="steps of the demo tokenizer")
    ns = p.parse_args(argv)
    setup_logging()
    main_job = ns.config is None
    cfg = config_from_args(argparse.Namespace(config=DEMO if main_job else ns.config, overrides=ns.overrides), Config)
    if ns.resume_from:
        cfg.checkpoint.resume_from = ns.resume_from
    absolutize_paths(cfg)
    if main_job:
        ensure_demo_data(cfg, DemoData(ns.demo_images, ns.demo_tokenizer_steps))
    if ns.launcher == "ray" and ns.local_rank is not None:
        raise UserError("started by a distributed launcher: add --launcher deepspeed")
    try:
        run = train_with_ray(cfg) if ns.launcher == "ray" else train_with_launcher(cfg)
    except RunFailed as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    if dist.rank() == 0:
        print("\n".join(report_lines(cfg, run.run_url)), flush=True)
        if run.stopped:
            print(f"training failed: {run.stopped}", file=sys.stderr)
    return 1 if run.stopped else 0


if __name__ == "__main__":
    raise SystemExit(main())
