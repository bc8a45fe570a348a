"""The main job (``python -m mqscale.train`` with no --config; ``make demo``): every stage of the
pipeline on the embedded shapes dataset, then proof that what it trained makes the images asked for.

Before training (``prepare``), each once, under runs/main:

1. data: the shapes dataset as image shards, a training set and a held-out set drawn from other
   indices, both verified (sha256 and every sample decoded);
2. judge: the quality judge trained on the training set, measured on the held-out set;
3. tokenizer: the demo MQ-VAE trained under Ray Train, a picture of what its masks keep
   (masks.png), and the judge's accuracy on its reconstructions of held-out images;
4. tokens: pre-tokenization of the training set.

Then the Stackformer trains (``train/launch.py``) with the judge logging its quality curve, and
``finish`` exports it, samples it exactly as ``python -m mqscale.sample`` does with no sampling
flags, and has the judge measure those samples (conditional accuracy, FD_judge), printed, logged
to TensorBoard and drawn as a labelled grid (samples.png). A rerun finds what exists and goes
straight to training. Each stage is a library call that returns what it made; every number
printed comes from this run.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from data_tools.make_shapes import KINDS, write_shapes
from data_tools.scan import scan
from mqscale.core import storage
from mqscale.core.console import setup_logging
from mqscale.core.errors import InputError, RunFailed
from mqscale.core.images import grid_png
from mqscale.core.tensorboard import tensorboard_location
from mqscale.data.loader import iter_images
from mqscale.evaluate.generation import judge_generator
from mqscale.evaluate.reconstruction import evaluate_tokenizer
from mqscale.generate.generator import ImageGenerator, SamplingSettings
from mqscale.judge.config import JudgeTrainConfig
from mqscale.judge.metrics import LoadedJudge, load_judge
from mqscale.judge.train import train_judge
from mqscale.tokenize.jobs import Options
from mqscale.tokenize.pool import run as tokenize_run
from mqscale.tokenize.pool import summary_lines
from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config
from mqscale.tokenizer.launch import train_on_ray
from mqscale.tokenizer.visualize import mask_picture
from mqscale.train.config import Config
from mqscale.train.export import export

TOKENIZER_CONFIG = "configs/mqvae/demo.yaml"
HELDOUT_START = 10_000_000   # held-out images are drawn from indices no training set reaches
VARIETY = "demo"             # make_shapes' centred objects (see make_image): what 15 CPU minutes can learn


@dataclass
class DemoSettings:
    images: int = 4000            # training images (judge, tokenizer, Stackformer)
    heldout: int = 1000           # held-out images (judge accuracy, reconstruction accuracy, FD_judge)
    resolution: int = 32
    judge_epochs: int = 10
    tokenizer_steps: int = 2000
    samples_per_class: int = 20   # the final measure: 200 images over the 10 classes
    stages: dict[str, float] = field(default_factory=dict)   # seconds per stage, filled as they run

    def timed(self, stage: str, t0: float) -> float:
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - t0
        return self.stages[stage]


@dataclass
class DemoPaths:
    """Where the demo keeps what it builds: everything under ``root``, the image sets under
    ``data`` (default: root; the ablation shares one set among its variants)."""
    root: Path
    judge: str = ""      # logging.judge; empty: data/judge
    data: Path | None = None

    def __post_init__(self):
        self.data = self.data or self.root
        self.judge = self.judge or str(self.data / "judge")

    @property
    def shapes(self) -> str:
        return str(self.data / "shapes")

    @property
    def heldout(self) -> str:
        return str(self.data / "shapes-heldout")

    @property
    def masks(self) -> str:
        return str(self.root / "masks.png")

    @property
    def samples(self) -> str:
        return str(self.root / "samples.png")

    @property
    def export(self) -> str:
        return str(self.root / "exported")

    @property
    def tokenizer_runs(self) -> str:
        return str(self.root / "tokenizer_runs")


def paths(cfg: Config) -> DemoPaths:
    return DemoPaths(Path(cfg.data.train_url).parent, cfg.logging.judge)


def prepare(cfg: Config, demo: DemoSettings) -> str:
    """Build what training needs, each piece only when it is missing. Returns the judge's path
    (``logging.judge`` when set, else runs/main/judge)."""
    setup_logging()
    tokens, tok_dir, p = cfg.data.train_url, cfg.logging.tokenizer, paths(cfg)
    have_tokens = storage.exists(storage.join(tokens, "manifest.json")) and Path(tok_dir, "config.json").exists()
    if have_tokens and Path(p.judge, "config.json").exists():
        print(f"[main] demo data, judge, tokenizer {tok_dir} and token shards {tokens} found: straight to training")
        return p.judge
    print(f"[main] building the demo data under {p.root} (once)")
    t = time.perf_counter()
    data_step(p.shapes, demo.images, demo.resolution, start=0)
    data_step(p.heldout, demo.heldout, demo.resolution, start=HELDOUT_START)
    demo.timed("data", t)
    t = time.perf_counter()
    judge = judge_step(p, demo, cfg.logging.judge_min_accuracy)
    demo.timed("judge", t)
    if not have_tokens:
        t = time.perf_counter()
        install_tokenizer(tokenizer_step(p, demo), tok_dir)
        demo.timed("tokenizer", t)
        t = time.perf_counter()
        reconstruction_step(tok_dir, p, judge, demo)
        demo.timed("tokenizer", t)
        t = time.perf_counter()
        tokenize_step(tok_dir, p.shapes, tokens)
        demo.timed("tokenize", t)
    return p.judge


def data_step(out: str, count: int, resolution: int, start: int) -> None:
    res = write_shapes(out, count, resolution=resolution, shard_size=500, start=start, progress=False,
                       variety=VARIETY)
    rep, _ = scan(out, check_sha=True)
    print(f"[data] {res.samples} shapes images in {rep.shards} shards at {out}; verify: "
          f"{'OK' if rep.ok else 'FAILED'}, {rep.samples} decoded, {len(rep.bad)} bad")
    if not rep.ok:
        raise InputError(f"the demo image shards at {out} did not verify: {rep.bad[:3]}")


def judge_step(p: DemoPaths, demo: DemoSettings, min_accuracy: float) -> LoadedJudge:
    if Path(p.judge, "config.json").exists():
        judge = load_judge(p.judge, min_accuracy=min_accuracy)
        print(f"[judge] found: {judge.describe()}")
        return judge
    judge, s = train_judge(p.shapes, p.judge, p.heldout, demo.resolution, JudgeTrainConfig(epochs=demo.judge_epochs))
    print(f"[judge] trained on {s['train_images']} images in {s['seconds']:.0f}s: held-out accuracy "
          f"{s['heldout_accuracy']:.3f} (worst class {s['worst_class_accuracy']:.3f}) over {s['heldout_images']} "
          f"images; FD_judge of held-out half vs half {s['fd_floor']:.2f} -> {p.judge}")
    return load_judge(p.judge, min_accuracy=min_accuracy)   # refused with one line if too weak to trust


def tokenizer_step(p: DemoPaths, demo: DemoSettings, overrides: tuple[str, ...] = ()) -> str:
    """Train the demo tokenizer (``overrides`` amending configs/mqvae/demo.yaml) under Ray Train.
    Returns its newest verified checkpoint."""
    t = time.perf_counter()
    cfg = load_tokenizer_config(TOKENIZER_CONFIG, [f"data.train_url={p.shapes}", f"train.max_steps={demo.tokenizer_steps}",
                                                   f"checkpoint.dir={p.tokenizer_runs}",
                                                   f"logging.tensorboard_dir={p.tokenizer_runs}/tb", *overrides])
    ckpt = train_on_ray(cfg).checkpoint
    if ckpt is None:
        raise RunFailed(f"the demo tokenizer run under {p.root}/tokenizer_runs left no verified checkpoint")
    print(f"[tokenizer] trained {demo.tokenizer_steps} steps under Ray Train in {time.perf_counter() - t:.0f}s -> {ckpt}")
    return ckpt


def install_tokenizer(checkpoint: str, tok_dir: str) -> None:
    """The checkpoint's export files (a tokenizer checkpoint is an export) copied to ``tok_dir``,
    the config last, as an export is written."""
    Path(tok_dir).mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(Path(checkpoint) / name, Path(tok_dir) / name)


def reconstruction_step(tokenizer: str, p: DemoPaths, judge: LoadedJudge, demo: DemoSettings) -> dict:
    """The masks picture of held-out images, and the judge's verdict on the reconstructions."""
    print(f"[tokenizer] {mask_picture(tokenizer, p.heldout, 8, p.masks).describe()}")
    tok, tcfg = TOKENIZER.load(tokenizer)
    res = evaluate_tokenizer(tok, iter_images(p.heldout, tcfg.model.resolution, demo.heldout, 250, labelled=True),
                             judge=judge)
    m = res.metrics
    print(f"[tokenizer] held-out reconstructions: judged correct {m['recon_accuracy']:.3f} (originals "
          f"{m['original_accuracy']:.3f}), FD_judge {m['fd_judge']:.2f}, PSNR {m['psnr']:.1f} dB over "
          f"{m['images']:.0f} images; L = {m['seq_len']:.0f} of {tcfg.model.grid ** 2} cells")
    return m


def tokenize_step(tokenizer: str, shapes: str, out: str) -> None:
    t = time.perf_counter()
    lines = summary_lines(tokenize_run(Options(tokenizer=tokenizer, input=shapes, output=out), workers=1,
                                       progress=False))
    print(f"[tokenize] {lines[0]} in {time.perf_counter() - t:.0f}s")
    for line in lines[1:3]:
        print(f"[tokenize] {line}")


@torch.no_grad()
def finish(cfg: Config, run_url: str, demo: DemoSettings) -> dict:
    """Export the run, sample it as ``mqscale.sample`` does by default, and judge the samples."""
    t = time.perf_counter()
    p = paths(cfg)
    export(run_url, p.export, cfg.checkpoint.storage_options)
    gen = ImageGenerator(p.export, cfg.logging.tokenizer)
    settings = gen.settle(SamplingSettings())
    judge = load_judge(p.judge, resolution=gen.tok_cfg.model.resolution, min_accuracy=cfg.logging.judge_min_accuracy)
    n_cls = gen.run_cfg.model.n_classes
    q = judge_generator(gen, settings, judge, demo.samples_per_class * n_cls)
    cond = torch.arange(n_cls).repeat_interleave(10)          # the picture: 10 per class, one row each
    images = torch.cat(list(gen.images(cond, len(cond), settings)))
    names = [f"{i}: {KINDS[i]}" if i < len(KINDS) else str(i) for i in range(n_cls)]
    storage.write_bytes(p.samples, grid_png(images, cols=10, row_labels=names, min_cell=64))
    step = cfg.train.max_steps
    with SummaryWriter(tensorboard_location(run_url, cfg.logging.tensorboard_dir)) as w:
        for k in ("cond_acc", "fd_judge", "worst_class_cond_acc"):
            w.add_scalar(f"quality/final_{k}", q[k], step)
    demo.timed("final evaluation", t)
    guided = f"guidance {settings.guidance:g}" if settings.guidance else "no guidance"
    print(f"[quality] {q['images']:.0f} samples ({guided}, temperature {settings.code.temperature:g}, as "
          f"python -m mqscale.sample draws by default): judged the class asked for {q['cond_acc']:.3f} "
          f"(chance {1 / n_cls:.2f}; worst class {q['worst_class_cond_acc']:.3f}), FD_judge {q['fd_judge']:.2f} "
          f"-> {p.samples}")
    print(f"[quality] sample it yourself: python -m mqscale.sample --model {p.export} --tokenizer "
          f"{cfg.logging.tokenizer} --classes 0,1,2,3,4,5,6,7,8,9 -n 8 --out samples.png")
    print("[main] wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in demo.stages.items())
          + f"; total {sum(demo.stages.values()) / 60:.1f} min")
    return q
