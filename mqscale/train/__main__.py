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
import time

from mqscale.core import dist
from mqscale.core.cli import UserError, add_config_args, config_from_args, guarded
from mqscale.core.config import absolutize_paths
from mqscale.core.console import setup_logging
from mqscale.core.errors import RunFailed
from mqscale.demo import DemoSettings, finish, prepare
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
    d = DemoSettings()
    g.add_argument("--demo-images", type=int, default=d.images, help="shapes training images to build")
    g.add_argument("--demo-heldout", type=int, default=d.heldout, help="held-out shapes images to build")
    g.add_argument("--demo-judge-epochs", type=int, default=d.judge_epochs, help="epochs of the quality judge")
    g.add_argument("--demo-tokenizer-steps", type=int, default=d.tokenizer_steps,
                   help="steps of the demo tokenizer")
    g.add_argument("--demo-samples-per-class", type=int, default=d.samples_per_class,
                   help="samples per class the final quality is measured on")
    ns = p.parse_args(argv)
    setup_logging()
    main_job = ns.config is None
    cfg = config_from_args(argparse.Namespace(config=DEMO if main_job else ns.config, overrides=ns.overrides), Config)
    if ns.resume_from:
        cfg.checkpoint.resume_from = ns.resume_from
    absolutize_paths(cfg)
    if main_job:
        demo = DemoSettings(ns.demo_images, ns.demo_heldout, judge_epochs=ns.demo_judge_epochs,
                            tokenizer_steps=ns.demo_tokenizer_steps, samples_per_class=ns.demo_samples_per_class)
        cfg.logging.judge = prepare(cfg, demo)   # the quality curve, from the judge the demo trained
    if ns.launcher == "ray" and ns.local_rank is not None:
        raise UserError("started by a distributed launcher: add --launcher deepspeed")
    t = time.perf_counter()
    try:
        run = train_with_ray(cfg) if ns.launcher == "ray" else train_with_launcher(cfg)
    except RunFailed as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    if dist.rank() == 0:
        print("\n".join(report_lines(cfg, run.run_url)), flush=True)
        if run.stopped:
            print(f"training failed: {run.stopped}", file=sys.stderr)
        elif main_job:
            demo.timed("stackformer", t)
            finish(cfg, run.run_url, demo)
    return 1 if run.stopped else 0


if __name__ == "__main__":
    raise SystemExit(main())
