"""The three evaluation jobs (generator, tokenizer, mask-ratio sweep), each with its own run.

Every run has its own name, ``<name>-<job>-<YYYYmmdd-HHMMSS>`` unless one is given, so runs never
overwrite each other. Results go to ``<out>/results.json`` (default ``runs/eval/<run>``; any
fsspec URL) and to TensorBoard as hparams plus metrics under ``<logging.tensorboard_dir>/<run>``:
point TensorBoard at the root to compare runs side by side. A sweep writes one hparams session
per mask ratio (``<run>/mask_ratio=R``) and its metrics as scalars over L, so the HParams table
and the scalar plots show the trade-off. Each job returns its metrics and prints its summary.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass

import torch
from torch.utils.tensorboard import SummaryWriter

from mqscale.core import storage
from mqscale.core.config import from_dict, to_dict
from mqscale.core.errors import InputError
from mqscale.core.images import heat_map, png_bytes
from mqscale.core.secrets import redacted
from mqscale.core.session import default_device
from mqscale.core.tensorboard import safe_hparams
from mqscale.data.loader import iter_images
from mqscale.evaluate.config import EvalRunConfig
from mqscale.evaluate.fid import load_inception, missing_weights, source_identity
from mqscale.evaluate.generation import evaluate_generator, judge_generator, reference_stats
from mqscale.evaluate.reconstruction import evaluate_tokenizer
from mqscale.evaluate.sweep import markdown_table, parse_sweep, plot_png, sampling_speed
from mqscale.generate.generator import ImageGenerator, SamplingSettings, read_prompts, text_tokenizer_for
from mqscale.judge.metrics import LoadedJudge, load_judge
from mqscale.models.lpips import load_lpips
from mqscale.tokenize.text import encode_batch
from mqscale.tokenizer.config import TOKENIZER
from mqscale.train.config import STACKFORMER, Config, load_train_config


@dataclass
class EvalInputs:
    """What an evaluation measures: a tokenizer (sweep: or RATIO=DIR pairs), image shards, and for
    the generator job an exported Stackformer (with prompts when it is text-conditional)."""
    tokenizer: str
    data: str
    model: str = ""
    sweep: str = ""                    # mask_ratio=R1,R2,...
    prompts: str = ""
    text_tokenizer: str = ""
    speed_config: str = "configs/stackformer/debug.yaml"   # sweep without a model: the timed architecture
    speed_batch: int = 16

    @property
    def job(self) -> str:
        return "sweep" if self.sweep else "generator" if self.model else "tokenizer"


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
            raise InputError(f"--tokenizer {text!r}: give DIR, or RATIO=DIR pairs separated by commas") from None
    return out


_RUN_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9._=-]+")


class Evaluation:
    """What every job shares: the config, the device, the weights it loads once, the outputs."""

    def __init__(self, cfg: EvalRunConfig, inputs: EvalInputs, device: str = "", run_name: str = "", out: str = ""):
        self.cfg, self.inputs, self.job = cfg, inputs, inputs.job
        self.storage_options = cfg.eval.storage_options
        self.device = torch.device(device) if device else default_device()
        if run_name and not _RUN_NAME.fullmatch(run_name):
            raise InputError(f"--run-name {run_name!r}: use letters, digits and . _ = - only (one directory name)")
        self.explicit_out = bool(out)
        self.run = run_name or self._fresh_run_name()
        self.out = out or f"runs/eval/{self.run}"
        self.tb = f"{cfg.logging.tensorboard_dir.rstrip('/')}/{self.run}"
        self._inception = None

    def _fresh_run_name(self) -> str:
        """``<name>-<job>-<time>``, with a counter where a run of the same second exists."""
        base = f"{self.cfg.name}-{self.job}-{time.strftime('%Y%m%d-%H%M%S')}"
        root = self.cfg.logging.tensorboard_dir.rstrip("/")
        for i in range(1, 1000):
            name = base if i == 1 else f"{base}-{i}"
            if not (storage.exists(f"{root}/{name}", self.storage_options) or
                    (not self.explicit_out and storage.exists(f"runs/eval/{name}", self.storage_options))):
                return name
        raise InputError(f"{root}: 999 runs named {base}-*; give --run-name")

    def inception(self, required: bool):
        """(model, sha256), or None when not required and no weights are configured."""
        e = self.cfg.eval
        if not e.inception_weights:
            if required:
                raise missing_weights()
            return None
        if self._inception is None:
            self._inception = load_inception(e.inception_weights, self.storage_options, self.device, e.inception_size)
        return self._inception

    def judge(self, resolution: int) -> LoadedJudge | None:
        """The configured judge, checked against the images measured (resolution, dataset), or None."""
        e = self.cfg.eval
        if not e.judge:
            return None
        try:
            dataset = source_identity(self.inputs.data, self.storage_options)
        except (OSError, ValueError):
            dataset = None   # a brace pattern: no manifest to check the judge against
        return load_judge(e.judge, self.device, resolution=resolution, dataset_sha256=dataset,
                          min_accuracy=e.judge_min_accuracy)

    def lpips(self):
        e = self.cfg.eval
        if not (e.vgg_weights and e.lpips_weights):
            return None
        return load_lpips(e.vgg_weights, e.lpips_weights, self.storage_options).to(self.device)

    def tokenizer(self, path: str):
        return TOKENIZER.load(path, self.device)

    def write(self, name: str, data: bytes) -> str:
        url = storage.join(self.out, name)
        storage.write_bytes(url, data, self.storage_options)
        return url

    def report(self, job: str, metrics: dict, hparams: dict, extra: dict | None = None,
               sessions: list[tuple[str, dict, dict]] = (), curves: list[tuple[int, dict]] = ()) -> str:
        """results.json and TensorBoard; returns the JSON's URL. ``metrics`` with ``hparams`` are
        the run's own hparams session; each of ``sessions`` (sub-run name, hparams, metrics) is
        one more, in ``<run>/<sub-run>``; ``curves`` (step, metrics) are scalars of the run."""
        record = {"job": job, "name": self.cfg.name, "run": self.run, "tensorboard": self.tb,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hparams": hparams, "metrics": metrics,
                  "config": redacted(to_dict(self.cfg)), **(extra or {})}
        url = self.write("results.json", (json.dumps(record, indent=1) + "\n").encode())
        with SummaryWriter(self.tb) as w:
            if metrics or not sessions:
                w.add_hparams(safe_hparams(hparams), _metrics(metrics), run_name=".")
            for sub, hp, m in sessions:
                w.add_hparams(safe_hparams(hp), _metrics(m), run_name=sub)
            for step, m in curves:
                for k, v in _metrics(m).items():
                    w.add_scalar(k, v, global_step=step)
        print(f"results: {url}; TensorBoard: tensorboard --logdir {self.tb}")
        return url


def _metrics(m: dict) -> dict[str, float]:
    return {f"eval/{k}": float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_generator(ev: Evaluation, settings: SamplingSettings) -> dict:
    """FID/IS with the Inception weights, conditional accuracy and FD_judge with a judge: whichever
    are configured (at least one)."""
    e, ns = ev.cfg.eval, ev.inputs
    gen = ImageGenerator(ns.model, ns.tokenizer, ev.device)
    settings = gen.settle(settings)
    judge = ev.judge(gen.tok_cfg.model.resolution) if gen.cond_kind == "class" else None
    inception = ev.inception(required=judge is None)
    prompts = None
    if gen.cond_kind == "text":
        if not ns.prompts:
            raise InputError("a text-conditional model needs --prompts FILE (one caption per line)")
        tok = text_tokenizer_for(gen, ns.text_tokenizer, ev.storage_options)
        prompts = torch.from_numpy(encode_batch(tok, read_prompts(ns.prompts, ev.storage_options),
                                                gen.run_cfg.model.text_len)).long()
    m: dict = {}
    if inception is not None:
        model, sha = inception
        ref = reference_stats(ns.data, model, sha, gen.tok_cfg.model.resolution, e.num_reference, e.batch_size,
                              ev.storage_options)
        m.update(evaluate_generator(gen, settings, model, ref, e.num_samples, e.is_splits, prompts))
        print(f"FID {m['fid']:.3f}  IS {m['is']:.3f} ± {m['is_std']:.3f}  ({m['images']:.0f} generated vs "
              f"{m['reference_images']:.0f} reference images; {m['images_per_s']:.1f} images/s sampling)")
    if judge is not None:
        q = judge_generator(gen, settings, judge, e.num_samples)
        print(f"conditional accuracy {q['cond_acc']:.3f} (worst class {q['worst_class_cond_acc']:.3f}), FD_judge "
              f"{q['fd_judge']:.2f} over {q['images']:.0f} images ({q['images_per_s']:.1f} images/s); {judge.describe()}")
        m.update({k: v for k, v in q.items() if k not in m})
    hp = {"job": "generator", "model": ns.model, "tokenizer": ns.tokenizer, "guidance_scale": settings.guidance or 0.0,
          "code_temperature": settings.code.temperature, "code_top_k": settings.code.top_k,
          "code_top_p": settings.code.top_p, "pos_temperature": settings.pos.temperature,
          "pos_top_k": settings.pos.top_k, "pos_top_p": settings.pos.top_p, "raster": settings.raster,
          "seed": settings.seed, "judge": e.judge}
    ev.report("generator", m, hp)
    return m


def run_tokenizer(ev: Evaluation) -> dict:
    e, ns = ev.cfg.eval, ev.inputs
    tok, tcfg = ev.tokenizer(ns.tokenizer)
    inc = ev.inception(required=False)
    judge = ev.judge(tcfg.model.resolution)
    res = evaluate_tokenizer(tok, iter_images(ns.data, tcfg.model.resolution, e.num_images, e.batch_size,
                                              ev.storage_options, labelled=judge is not None),
                             inception=inc[0] if inc else None, lpips=ev.lpips(), judge=judge)
    m = res.metrics
    side = 16 * tcfg.model.grid
    ev.write("mask_map.png", png_bytes(heat_map(torch.from_numpy(res.mask_map)[None], max(side, 128))[0]))
    shown = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("images", "seq_len", "mask_ratio"))
    print(f"tokenizer over {m['images']:.0f} images, L = {m['seq_len']:.0f} of {tcfg.model.grid ** 2} cells: {shown}")
    missing = [w for w, ok in (("LPIPS (eval.vgg_weights, eval.lpips_weights)", "lpips" in m),
                               ("rFID (eval.inception_weights)", "rfid" in m),
                               ("reconstruction accuracy (eval.judge)", "recon_accuracy" in m)) if not ok]
    if missing:
        print(f"not measured, no weights given: {', '.join(missing)}")
    hp = {"job": "tokenizer", "tokenizer": ns.tokenizer, "mask_ratio": m["mask_ratio"], "seq_len": m["seq_len"]}
    ev.report("tokenizer", m, hp, {"mask_map": res.mask_map.tolist()})
    return m


def run_sweep(ev: Evaluation) -> list[dict]:
    e, ns = ev.cfg.eval, ev.inputs
    ratios = parse_sweep(ns.sweep)
    toks = parse_tokenizers(ns.tokenizer)
    if None not in toks and sorted(toks) != ratios:
        raise InputError(f"--tokenizer names ratios {sorted(toks)}, --sweep asks for {ratios}")
    if ns.model:  # the architecture whose sampling is timed: the exported model's
        arch = from_dict(STACKFORMER.meta(ns.model)["config"], f"{ns.model}/config.json", Config).model
    else:
        arch = load_train_config(ns.speed_config).model
    inc = ev.inception(required=False)
    lp = ev.lpips()
    rows = []
    for r in ratios:
        tok, tcfg = ev.tokenizer(toks.get(r, toks.get(None)))
        G = tcfg.model.grid ** 2
        keep = max(1, round(r * G))
        res = evaluate_tokenizer(tok, iter_images(ns.data, tcfg.model.resolution, e.num_images, e.batch_size,
                                                  ev.storage_options), inception=inc[0] if inc else None, lpips=lp,
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
