"""python -m mqscale.train [--config CONFIG] [section.key=value ...] [--launcher ray|deepspeed]

With Ray (default): a Ray Train TorchTrainer with ``ray.num_workers`` DeepSpeed workers, on a
local Ray, the cluster at ``ray.address``, or under ``ray job submit``. With ``--launcher
deepspeed`` (run by ``deepspeed --hostfile H -m mqscale.train ...``): the same loop in the
processes the launcher starts. With no --config: the main job, configs/demo.yaml, which first
builds its demo token shards and tokenizer when they are missing (see ``main_job.py``).
"""
from __future__ import annotations

import argparse
import logging
import sys

from mqscale.cli import UserError, add_config_args, config_from_args, guarded
from mqscale.config import Config, from_dict, to_dict
from mqscale.train.main_job import DemoData

DEMO = "configs/demo.yaml"


def worker(config: dict) -> None:
    """Runs on every Ray Train worker. A run that stopped itself (TrainingStopped) returns normally:
    raised, Ray would take it for a worker failure and restart the group within ``ray.max_failures``.
    Its reason reached the driver with the final checkpoint's report (``stopped_reason``)."""
    from mqscale.train.ray_session import RaySession
    from mqscale.train.trainer import TrainingStopped, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_url = config.pop("_run_url")
    cfg = from_dict(config, "train_loop_config")
    session = RaySession(run_url)
    try:
        train(cfg, session)
    except TrainingStopped as e:
        if session.rank == 0:
            logging.getLogger("mqscale.train").error("stopped: %s", e)


def stopped_reason(result) -> str | None:
    """Why the run stopped itself, from the metrics of its last checkpoint report (None: it did not)."""
    metrics = getattr(result, "metrics", None) or {}
    return metrics.get("stopped_reason") or None


def absolutize(cfg: Config) -> None:
    from mqscale.train.ray_launch import absolute
    cfg.data.train_url = absolute(cfg.data.train_url)
    cfg.checkpoint.dir = absolute(cfg.checkpoint.dir)
    cfg.checkpoint.resume_from = absolute(cfg.checkpoint.resume_from)
    cfg.logging.tokenizer = absolute(cfg.logging.tokenizer)
    cfg.logging.tensorboard_dir = absolute(cfg.logging.tensorboard_dir)
    cfg.deepspeed.config_json = absolute(cfg.deepspeed.config_json)


def run_url(cfg: Config) -> str:
    return cfg.checkpoint.dir.rstrip("/") + "/" + cfg.name


def with_ray(cfg: Config) -> int:
    import ray

    from mqscale.train.ray_launch import failure_line, launch
    from mqscale.train.validate import validate_run

    url = run_url(cfg)
    validate_run(cfg, cfg.ray.num_workers, url)
    ours = not ray.is_initialized()  # launch() starts a local Ray then
    try:
        result = launch(worker, {**to_dict(cfg), "_run_url": url}, cfg.ray, cfg.checkpoint, cfg.name)
    except Exception as e:  # the workers' tracebacks are already in the log above
        print(f"training failed: {failure_line(e)}", file=sys.stderr)
        return 1
    report(cfg, url)
    why = stopped_reason(result)
    if why:
        if ours:  # the workers' last log lines come out before the reason
            ray.shutdown()
        sys.stdout.flush()
        print(f"training failed: {why}", file=sys.stderr)
        return 1
    return 0


def with_deepspeed(cfg: Config) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from mqscale.train.session import LauncherSession
    from mqscale.train.trainer import train
    from mqscale.train.validate import validate_run

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    url = run_url(cfg)
    validate_run(cfg, dist.get_world_size(), url)
    from mqscale.train.trainer import TrainingStopped
    try:
        train(cfg, LauncherSession(url, cfg.checkpoint.storage_options, cfg.checkpoint.keep_last))
    except TrainingStopped as e:
        if dist.get_rank() == 0:
            print(f"training failed: {e}", file=sys.stderr)
        return 1
    if dist.get_rank() == 0:
        report(cfg, url)
    dist.barrier()
    return 0


def report(cfg: Config, url: str) -> None:
    from mqscale.train.checkpoint import CheckpointStore
    found = CheckpointStore(url, cfg.checkpoint.storage_options).candidates()
    tb = cfg.logging.tensorboard_dir or (f"{url}/tb" if "://" not in url else f"{url}/tb (synced)")
    print(f"run: {url}")
    print(f"checkpoints: {', '.join(f.url.rsplit('/', 1)[-1] for f in found[:3]) or 'none'}")
    if found:
        print(f"export: python -m mqscale.export {found[0].url} exported/{cfg.name}")
    from mqscale.data import fs
    final = fs.join(url, f"samples/step_{cfg.train.max_steps:09d}.png")
    if cfg.logging.tokenizer and fs.exists(final, cfg.checkpoint.storage_options):
        print(f"samples: {final} (one row per class)")
    print(f"tensorboard: tensorboard --logdir {tb.split(' ')[0]}")


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main_job = ns.config is None
    if main_job:
        ns.config = DEMO
    cfg = config_from_args(ns)
    if ns.resume_from:
        cfg.checkpoint.resume_from = ns.resume_from
    absolutize(cfg)
    if main_job:
        from mqscale.train.main_job import ensure_demo_data
        ensure_demo_data(cfg, DemoData(ns.demo_images, ns.demo_tokenizer_steps))
    if ns.launcher == "deepspeed":
        return with_deepspeed(cfg)
    if ns.local_rank is not None:
        raise UserError("started by a distributed launcher: add --launcher deepspeed")
    return with_ray(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
