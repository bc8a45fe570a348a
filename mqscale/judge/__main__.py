"""python -m mqscale.judge --images IMAGE_SHARDS --out DIR [--heldout IMAGE_SHARDS] [--resolution R] [options]

Trains the quality judge on a class-labelled image shard set (usually the dataset's own training
shards) and exports it to DIR (model.safetensors + config.json). With --heldout its accuracy and
feature statistics come from that set; without, from every 10th image of --images, left out of
training. A judge whose held-out accuracy is below 0.97 is still written, but every later use
refuses it unless told otherwise. Use it with ``mqscale.evaluate ... eval.judge=DIR`` and in
training with ``logging.judge=DIR``.
"""
from __future__ import annotations

import argparse
import json

from mqscale.core.cli import add_storage_options_arg, guarded
from mqscale.core.console import setup_logging
from mqscale.core.session import default_device
from mqscale.judge.config import MIN_ACCURACY, JudgeTrainConfig
from mqscale.judge.train import train_judge


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="class-labelled image shards to train on")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--heldout", default="", help="held-out image shards (default: every 10th image of --images)")
    p.add_argument("--resolution", type=int, default=0, help="image side; default: the images' own")
    d = JudgeTrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-images", type=int, default=0, help="training images to read; 0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    add_storage_options_arg(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    ns = p.parse_args(argv)
    setup_logging()
    cfg = JudgeTrainConfig(width=ns.width, epochs=ns.epochs, batch_size=ns.batch_size, lr=ns.lr,
                           seed=ns.seed, max_images=ns.max_images, augment=ns.augment)
    judge, summary = train_judge(ns.images, ns.out, ns.heldout, ns.resolution, cfg, ns.storage_options,
                                 ns.device or default_device())
    if ns.json:
        print(json.dumps(summary))
        return 0
    trusted = summary["heldout_accuracy"] >= MIN_ACCURACY
    print(f"{judge.describe()} (worst class {summary['worst_class_accuracy']:.3f}; FD floor "
          f"{summary['fd_floor']:.2f}; trained on {summary['train_images']} images in {summary['seconds']:.0f}s) -> "
          f"{ns.out}" + ("" if trusted else f"; UNTRUSTWORTHY (below {MIN_ACCURACY}): later stages refuse it"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
