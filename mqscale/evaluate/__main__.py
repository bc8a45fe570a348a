"""python -m mqscale.evaluate --tokenizer TOK --data IMAGE_SHARDS [--model EXPORTED] [--sweep mask_ratio=R,...]
    [--config configs/eval/default.yaml] [section.key=value ...] [--out URL] [sampling options]

Three jobs, by the arguments given:

- ``--model``: the generator. FID and IS of ``eval.num_samples`` images sampled from the exported
  Stackformer (and decoded by TOK) against the reference statistics of IMAGE_SHARDS, computed once
  and stored beside the shards with a checksum. Needs ``eval.inception_weights``.
- neither: the tokenizer. PSNR, SSIM, LPIPS (with ``eval.vgg_weights`` + ``eval.lpips_weights``),
  rFID (with ``eval.inception_weights``), codebook usage and perplexity, and the mean kept-cell map,
  over the first ``eval.num_images`` images.
- ``--sweep mask_ratio=0.1,0.25,0.5``: the paper's trade-off. Tokenizer quality at each ratio
  against sequence length and Stackformer sampling speed: a table and a PNG plot. TOK is one
  tokenizer (its mask keeps r*G cells at inference) or one per ratio: ``0.1=DIR,0.25=DIR``; the
  timed Stackformer has ``--model``'s architecture, or ``--speed-config``'s.

Every run has its own name (``--run-name``, or ``<name>-<job>-<date-time>``); results go to
``<out>/results.json`` and to TensorBoard under ``<logging.tensorboard_dir>/<run>`` (``jobs.py``).
"""
from __future__ import annotations

import argparse

from mqscale.core.cli import guarded
from mqscale.evaluate.config import load_eval_config
from mqscale.evaluate.jobs import EvalInputs, Evaluation, run_generator, run_sweep, run_tokenizer
from mqscale.generate.generator import add_sampling_args, settings_from_args


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="exported tokenizer directory (sweep: or RATIO=DIR,...)")
    p.add_argument("--data", required=True, help="image shards: manifest, its directory, or a brace pattern")
    p.add_argument("--model", default="", help="exported Stackformer: measure the generator (FID, IS)")
    p.add_argument("--sweep", default="", help="mask_ratio=R1,R2,...: the mask-ratio trade-off")
    p.add_argument("--config", default="configs/eval/default.yaml", help="evaluation config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. eval.num_samples=10000")
    p.add_argument("--out", default="", help="results directory, any fsspec URL (default runs/eval/<run>)")
    p.add_argument("--prompts", default="", help="captions, one per line (text-conditional generators)")
    p.add_argument("--text-tokenizer", default="", help="bytes, or a tokenizers JSON (default: the one the "
                   "model's training shards record); refused unless it is the one they were made with")
    p.add_argument("--run-name", default="", help="this run's name: TensorBoard <logging.tensorboard_dir>/<run> "
                   "and the default --out (default: <name>-<job>-<date-time>, new for every run)")
    p.add_argument("--speed-config", default="configs/stackformer/debug.yaml",
                   help="sweep without --model: the Stackformer architecture whose sampling is timed")
    p.add_argument("--speed-batch", type=int, default=16, help="sweep: images per timed sampling batch")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    add_sampling_args(p)
    ns = p.parse_intermixed_args(argv)   # overrides may come before or after the options
    cfg = load_eval_config(ns.config, ns.overrides)
    inputs = EvalInputs(ns.tokenizer, ns.data, ns.model, ns.sweep, ns.prompts, ns.text_tokenizer, ns.speed_config,
                        ns.speed_batch)
    settings = settings_from_args(ns) if inputs.job == "generator" else None
    ev = Evaluation(cfg, inputs, ns.device, ns.run_name, ns.out)
    if inputs.job == "sweep":
        run_sweep(ev)
    elif inputs.job == "generator":
        run_generator(ev, settings)
    else:
        run_tokenizer(ev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
