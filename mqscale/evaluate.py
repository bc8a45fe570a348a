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

Every run has its own name, ``<name>-<job>-<YYYYmmdd-HHMMSS>`` unless ``--run-name`` sets one,
so runs never overwrite each other. Results go to ``<out>/results.json`` (default
``runs/eval/<run>``; any fsspec URL) and to TensorBoard as hparams plus metrics under
``<logging.tensorboard_dir>/<run>``: point TensorBoard at the root to compare runs side by side.
A sweep writes one hparams session per mask ratio (``<run>/mask_ratio=R``) and its metrics as
scalars over L, so the HParams table and the scalar plots show the trade-off.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time

import torch

from mqscale.cli import UserError, guarded
from mqscale.config import redacted, to_dict
from mqscale.eval_config import EvalRunConfig, load_eval_config


def parse_tokenizers(text: str) -> dict[float | None, str]:
    """``DIR`` -> {None: DIR}; ``0.1=DIR,0.25=DIR`` -> {0.1: DIR, 0.25: DIR}."""
    if "=" not in text:
        return {None: text}
    out = {}
    for item in text.split(","):
        r, _, d = item.partition("=")
        try:
            out[float(r)] = d
        except ValueError:
            raise UserError(f"--tokenizer {text!r}: give DIR, or RATIO=DIR pairs separated by commas") from None
    return out


_RUN_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9._=-]+")


class Evaluation:
    """What every job shares: the config, the device, the weights it loads once, the outputs."""

    def __init__(self, cfg: EvalRunConfig, ns: argparse.Namespace, job: str):
        self.cfg, self.ns, self.job = cfg, ns, job
        self.so = cfg.eval.storage_options
        self.device = torch.device(ns.device) if ns.device else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if ns.run_name and not _RUN_NAME.fullmatch(ns.run_name):
            raise UserError(f"--run-name {ns.run_name!r}: use letters, digits and . _ = - only (one directory name)")
        self.run = ns.run_name or self._fresh_run_name()
        self.out = ns.out or f"runs/eval/{self.run}"
        self.tb = f"{cfg.logging.tensorboard_dir.rstrip('/')}/{self.run}"
        self._inception = None

    def _fresh_run_name(self) -> str:
        """``<name>-<job>-<time>``, with a counter where a run of the same second exists."""
        from mqscale.data import fs
        base = f"{self.cfg.name}-{self.job}-{time.strftime('%Y%m%d-%H%M%S')}"
        root = self.cfg.logging.tensorboard_dir.rstrip("/")
        for i in range(1, 1000):
            name = base if i == 1 else f"{base}-{i}"
            if not (fs.exists(f"{root}/{name}", self.so) or
                    (not self.ns.out and fs.exists(f"runs/eval/{name}", self.so))):
                return name
        raise UserError(f"{root}: 999 runs named {base}-*; give --run-name")

    def inception(self, required: bool):
        """(model, sha256), or None when not required and no weights are configured."""
        from mqscale.evaluation.fid import load_inception, missing_weights
        e = self.cfg.eval
        if not e.inception_weights:
            if required:
                raise missing_weights()
            return None
        if self._inception is None:
            self._inception = load_inception(e.inception_weights, self.so, self.device, e.inception_size)
        return self._inception

    def lpips(self):
        e = self.cfg.eval
        if not (e.vgg_weights and e.lpips_weights):
            return None
        from mqscale.models.lpips import load_lpips
        try:
            return load_lpips(e.vgg_weights, e.lpips_weights, self.so).to(self.device)
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"LPIPS weights: {err}") from None

    def tokenizer(self, path: str):
        from mqscale.convert.export import load_exported
        return load_exported(path, self.device, expect="mqvae")

    def write(self, name: str, data: bytes) -> str:
        from mqscale.data import fs
        url = fs.join(self.out, name)
        fs.write_bytes(url, data, self.so)
        return url

    def report(self, job: str, metrics: dict, hparams: dict, extra: dict | None = None,
               sessions: list[tuple[str, dict, dict]] = (), curves: list[tuple[int, dict]] = ()) -> str:
        """results.json and TensorBoard; returns the JSON's URL. ``metrics`` with ``hparams`` are
        the run's own hparams session; each of ``sessions`` (sub-run name, hparams, metrics) is
        one more, in ``<run>/<sub-run>``; ``curves`` (step, metrics) are scalars of the run."""
        from torch.utils.tensorboard import SummaryWriter
        record = {"job": job, "name": self.cfg.name, "run": self.run, "tensorboard": self.tb,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hparams": hparams, "metrics": metrics,
                  "config": redacted(to_dict(self.cfg)), **(extra or {})}
        url = self.write("results.json", (json.dumps(record, indent=1) + "\n").encode())
        with SummaryWriter(self.tb) as w:
            if metrics or not sessions:
                w.add_hparams(_hparams(hparams), _metrics(metrics), run_name=".")
            for sub, hp, m in sessions:
                w.add_hparams(_hparams(hp), _metrics(m), run_name=sub)
            for step, m in curves:
                for k, v in _metrics(m).items():
                    w.add_scalar(k, v, global_step=step)
        print(f"results: {url}; TensorBoard: tensorboard --logdir {self.tb}")
        return url


def _hparams(hp: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hp.items()}


def _metrics(m: dict) -> dict[str, float]:
    return {f"eval/{k}": float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_generator(ev: Evaluation, settings) -> dict:
    from mqscale.evaluation.generation import evaluate_generator, reference_stats
    from mqscale.generate import ImageGenerator, text_tokenizer_for
    from mqscale.text_tokenizer import encode_batch

    e, ns = ev.cfg.eval, ev.ns
    inception, sha = ev.inception(required=True)
    gen = ImageGenerator(ns.model, ns.tokenizer, ev.device)
    gen.check_guidance(settings)
    prompts = None
    if gen.cond_kind == "text":
        if not ns.prompts:
            raise UserError("a text-conditional model needs --prompts FILE (one caption per line)")
        from mqscale.sample import read_prompts
        tok = text_tokenizer_for(gen, ns.text_tokenizer, ev.so)
        prompts = torch.from_numpy(encode_batch(tok, read_prompts(ns.prompts, ev.so), gen.run_cfg.model.text_len)).long()
    ref = reference_stats(ns.data, inception, sha, gen.tok_cfg.model.resolution, e.num_reference, e.batch_size, ev.so)
    m = evaluate_generator(gen, settings, inception, ref, e.num_samples, e.is_splits, prompts)
    print(f"FID {m['fid']:.3f}  IS {m['is']:.3f} ± {m['is_std']:.3f}  ({m['images']:.0f} generated vs "
          f"{m['reference_images']:.0f} reference images; {m['images_per_s']:.1f} images/s sampling)")
    hp = {"job": "generator", "model": ns.model, "tokenizer": ns.tokenizer, "cfg_scale": settings.guidance or 0.0,
          "code_temperature": settings.code.temperature, "code_top_k": settings.code.top_k,
          "code_top_p": settings.code.top_p, "pos_temperature": settings.pos.temperature,
          "pos_top_k": settings.pos.top_k, "pos_top_p": settings.pos.top_p, "raster": settings.raster,
          "seed": settings.seed}
    ev.report("generator", m, hp)
    return m


def run_tokenizer(ev: Evaluation) -> dict:
    from mqscale.evaluation.reconstruction import evaluate_tokenizer, iter_images
    from mqscale.train.tokenizer_visuals import heat, to_png

    e, ns = ev.cfg.eval, ev.ns
    tok, tcfg = ev.tokenizer(ns.tokenizer)
    inc = ev.inception(required=False)
    res = evaluate_tokenizer(tok, iter_images(ns.data, tcfg.model.resolution, e.num_images, e.batch_size, ev.so),
                             inception=inc[0] if inc else None, lpips=ev.lpips())
    m = res.metrics
    side = 16 * tcfg.model.grid
    ev.write("mask_map.png", to_png(heat(torch.from_numpy(res.mask_map)[None], max(side, 128))[0]))
    shown = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("images", "seq_len", "mask_ratio"))
    print(f"tokenizer over {m['images']:.0f} images, L = {m['seq_len']:.0f} of {tcfg.model.grid ** 2} cells: {shown}")
    missing = [w for w, ok in (("LPIPS (eval.vgg_weights, eval.lpips_weights)", "lpips" in m),
                               ("rFID (eval.inception_weights)", "rfid" in m)) if not ok]
    if missing:
        print(f"not measured, no weights given: {', '.join(missing)}")
    hp = {"job": "tokenizer", "tokenizer": ns.tokenizer, "mask_ratio": m["mask_ratio"], "seq_len": m["seq_len"]}
    ev.report("tokenizer", m, hp, {"mask_map": res.mask_map.tolist()})
    return m


def run_sweep(ev: Evaluation) -> list[dict]:
    from mqscale.config import load_config
    from mqscale.evaluation.reconstruction import evaluate_tokenizer, iter_images
    from mqscale.evaluation.sweep import markdown_table, parse_sweep, plot_png, sampling_speed

    e, ns = ev.cfg.eval, ev.ns
    ratios = parse_sweep(ns.sweep)
    toks = parse_tokenizers(ns.tokenizer)
    if None not in toks and sorted(toks) != ratios:
        raise UserError(f"--tokenizer names ratios {sorted(toks)}, --sweep asks for {ratios}")
    if ns.model:  # the architecture whose sampling is timed: the exported model's
        from mqscale.config import from_dict
        from mqscale.convert.export import read_meta
        arch = from_dict(read_meta(ns.model)["config"], f"{ns.model}/config.json").model
    else:
        arch = load_config(ns.speed_config).model
    inc = ev.inception(required=False)
    lp = ev.lpips()
    rows = []
    for r in ratios:
        tok, tcfg = ev.tokenizer(toks.get(r, toks.get(None)))
        G = tcfg.model.grid ** 2
        keep = max(1, round(r * G))
        res = evaluate_tokenizer(tok, iter_images(ns.data, tcfg.model.resolution, e.num_images, e.batch_size, ev.so),
                                 inception=inc[0] if inc else None, lpips=lp,
                                 keep=keep if None in toks else None)
        shaped = dataclasses.replace(arch, grid=tcfg.model.grid, codebook_size=tcfg.model.codebook_size)
        ips = sampling_speed(shaped, int(res.metrics["seq_len"]), ns.speed_batch, ev.device)
        row = {**res.metrics, "mask_ratio": r, "sampling_images_per_s": ips, "sampling_ms_per_image": 1000 / ips}
        rows.append(row)
        print(f"mask ratio {r:g}: L = {row['seq_len']:.0f}, PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}"
              + (f", rFID {row['rfid']:.2f}" if "rfid" in row else "")
              + f", sampling {ips:.1f} images/s")
    table = markdown_table(rows)
    ev.write("sweep.md", table.encode())
    title = (f"mask-ratio sweep: {'one tokenizer, ratio set at inference' if None in toks else 'a tokenizer per ratio'}"
             f"; Stackformer {arch.n_code_layer}+{arch.n_pos_layer} layers x {arch.n_embd}")
    plot = ev.write("sweep.png", plot_png(rows, title))
    print(table + f"plot: {plot}")
    shared = {"job": "sweep", "tokenizer": ns.tokenizer, "ratios": ",".join(map(str, ratios)),
              "per_ratio_tokenizers": None not in toks}
    ev.report("sweep", {}, shared, {"rows": rows},
              sessions=[(f"mask_ratio={r['mask_ratio']:g}", {**shared, "mask_ratio": r["mask_ratio"],
                                                             "seq_len": int(r["seq_len"])},
                         {k: v for k, v in r.items() if k not in ("mask_ratio", "seq_len")}) for r in rows],
              curves=[(int(r["seq_len"]), {k: v for k, v in r.items() if k != "seq_len"}) for r in rows])
    return rows


@guarded
def main(argv: list[str] | None = None) -> int:
    from mqscale.generate import add_sampling_args, settings_from_args

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
    job = "sweep" if ns.sweep else "generator" if ns.model else "tokenizer"
    settings = settings_from_args(ns) if job == "generator" else None
    ev = Evaluation(cfg, ns, job)
    if job == "sweep":
        run_sweep(ev)
    elif job == "generator":
        run_generator(ev, settings)
    else:
        run_tokenizer(ev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
