"""Images from an exported Stackformer and the tokenizer that made its training tokens.

``ImageGenerator`` pairs the two (checking that they agree on grid, codebook and L), turns a
condition list into batches of KV-cached samples (``mqscale.sampling.sample``, with
classifier-free guidance when asked) and decodes them. ``python -m mqscale.sample`` and
``python -m mqscale.evaluate`` both generate through it, with the same sampling flags
(``add_sampling_args``), so a grid and an FID run sample the same way.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mqscale.cli import UserError
from mqscale.sampling import SamplingParams, sample


@dataclass
class SamplingSettings:
    code: SamplingParams = field(default_factory=SamplingParams)
    pos: SamplingParams = field(default_factory=SamplingParams)
    raster: bool = True
    guidance: float | None = None      # classifier-free guidance scale; None: off
    batch_size: int = 32
    seed: int = 0
    precision: str = "auto"            # auto: bf16 on GPU, fp32 on CPU


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    for stream in ("code", "pos"):
        g.add_argument(f"--{stream}-temperature", type=float, default=1.0, metavar="T",
                       help=f"{stream} temperature; 0 = greedy (default %(default)s)")
        g.add_argument(f"--{stream}-top-k", type=int, default=0, metavar="K",
                       help=f"{stream} top-k; 0 = off (default %(default)s)")
        g.add_argument(f"--{stream}-top-p", type=float, default=1.0, metavar="P",
                       help=f"{stream} nucleus mass; 1 = off (default %(default)s)")
    g.add_argument("--no-raster", dest="raster", action="store_false",
                   help="let positions come in any order (the official sampler's behaviour)")
    g.add_argument("--cfg-scale", type=float, default=None, metavar="S",
                   help="classifier-free guidance: logits = cond + S*(cond - uncond); off when not given")
    g.add_argument("--batch-size", type=int, default=32, help="images per sampling batch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")


def settings_from_args(ns: argparse.Namespace) -> SamplingSettings:
    def params(s: str) -> SamplingParams:
        t, k, p = getattr(ns, f"{s}_temperature"), getattr(ns, f"{s}_top_k"), getattr(ns, f"{s}_top_p")
        if t < 0 or k < 0 or not 0 < p <= 1:
            raise UserError(f"--{s}-temperature must be >= 0, --{s}-top-k >= 0 and --{s}-top-p in (0, 1]")
        return SamplingParams(temperature=t, top_k=k, top_p=p)
    if ns.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return SamplingSettings(params("code"), params("pos"), ns.raster, ns.cfg_scale, ns.batch_size,
                            ns.seed, ns.precision)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ImageGenerator:
    """An exported Stackformer plus its tokenizer, ready to turn conditions into images."""

    def __init__(self, model_dir: str, tokenizer_dir: str, device: str | torch.device | None = None):
        from mqscale.convert.export import load_exported

        self.device = torch.device(device) if device else default_device()
        self.model, self.run_cfg = load_exported(model_dir, self.device, expect="stackformer")
        self.tokenizer, self.tok_cfg = load_exported(tokenizer_dir, self.device, expect="mqvae")
        m, t = self.run_cfg.model, self.tok_cfg.model
        for what, a, b in (("grid", m.grid, t.grid), ("codebook size", m.codebook_size, t.codebook_size),
                           ("sequence length L", m.seq_len, t.keep)):
            if a != b:
                raise UserError(f"{model_dir} ({what} {a}) was not trained on tokens of {tokenizer_dir} "
                                f"({what} {b})")

    @property
    def cond_kind(self) -> str:
        return self.run_cfg.model.cond

    def check_guidance(self, settings: SamplingSettings) -> None:
        if settings.guidance is None:
            return
        if self.cond_kind == "none":
            raise UserError("--cfg-scale needs a class- or text-conditional model; this one is unconditional")
        if self.run_cfg.train.p_uncond <= 0:
            raise UserError("--cfg-scale: this model was trained without condition dropout "
                            "(train.p_uncond=0), so its null condition is untrained; guidance needs p_uncond > 0")

    def _autocast(self, settings: SamplingSettings):
        bf16 = settings.precision == "bf16" or (settings.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def tokens(self, cond: torch.Tensor | None, n: int, settings: SamplingSettings
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(codes, positions) batches for ``n`` images; ``cond`` holds one condition per image
        (None for an unconditional model). One generator seeded once: same seed, same samples."""
        self.check_guidance(settings)
        if cond is not None and len(cond) != n:
            raise ValueError(f"{len(cond)} conditions for {n} images")
        gen = torch.Generator(self.device).manual_seed(settings.seed)
        for start in range(0, n, settings.batch_size):
            b = min(settings.batch_size, n - start)
            c = cond[start:start + b].to(self.device) if cond is not None else None
            with self._autocast(settings):
                yield sample(self.model, c, batch=b, code=settings.code, pos=settings.pos,
                             raster=settings.raster, generator=gen, guidance=settings.guidance)

    def images(self, cond: torch.Tensor | None, n: int, settings: SamplingSettings) -> Iterator[torch.Tensor]:
        """Decoded images in [-1, 1], [b, 3, H, W] float32 on the CPU, batch by batch."""
        for codes, positions in self.tokens(cond, n, settings):
            with self._autocast(settings):
                yield self.tokenizer.decode(codes, positions).float().clamp(-1, 1).cpu()


def timed_images(gen: ImageGenerator, cond: torch.Tensor | None, n: int,
                 settings: SamplingSettings) -> tuple[torch.Tensor, float]:
    """All ``n`` images at once, and images/s (sampling + decoding, device synchronised)."""
    t = time.perf_counter()
    out = torch.cat(list(gen.images(cond, n, settings)))
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    return out, n / (time.perf_counter() - t)
