"""Images from an exported Stackformer and the tokenizer that made its training tokens.

``ImageGenerator`` pairs the two (checking that they agree on grid, codebook and L), turns a
condition list into batches of KV-cached samples (Algorithm 1, ``models/stackformer/sampling.py``,
with classifier-free guidance when asked) and decodes them. ``python -m mqscale.sample`` and
``python -m mqscale.evaluate`` both generate through it, with the same sampling flags
(``add_sampling_args``) and prompts (``read_prompts``, ``text_tokenizer_for``), so a grid and an
FID run sample the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mqscale.core import storage
from mqscale.core.errors import InputError, ManifestError, StorageError
from mqscale.core.session import default_device
from mqscale.data.manifest import read_manifest
from mqscale.models.stackformer.sampling import (DEFAULT_GUIDANCE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K,
                                                  SamplingParams, default_params, sample)
from mqscale.tokenize.text import load_text_tokenizer
from mqscale.tokenizer.config import TOKENIZER
from mqscale.train.config import STACKFORMER


AUTO = "auto"


@dataclass
class SamplingSettings:
    """How images are drawn; the defaults are what ``mqscale.sample`` draws with no flags."""
    code: SamplingParams = field(default_factory=default_params)
    pos: SamplingParams = field(default_factory=default_params)
    raster: bool = True
    # classifier-free guidance scale; None: off; "auto": DEFAULT_GUIDANCE for a conditional model
    # trained with condition dropout, off otherwise (``ImageGenerator.settle``)
    guidance: float | str | None = AUTO
    batch_size: int = 32
    seed: int = 0
    precision: str = "auto"            # auto: bf16 on GPU, fp32 on CPU


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    for stream in ("code", "pos"):
        g.add_argument(f"--{stream}-temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                       help=f"{stream} temperature; 0 = greedy (default %(default)s)")
        g.add_argument(f"--{stream}-top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                       help=f"{stream} top-k; 0 = off (default %(default)s)")
        g.add_argument(f"--{stream}-top-p", type=float, default=1.0, metavar="P",
                       help=f"{stream} nucleus mass; 1 = off (default %(default)s)")
    g.add_argument("--no-raster", dest="raster", action="store_false",
                   help="let positions come in any order (the official sampler's behaviour)")
    g.add_argument("--cfg-scale", type=_guidance, default=AUTO, metavar="S",
                   help="classifier-free guidance: logits = cond + S*(cond - uncond); 0 = off; default: "
                   f"{DEFAULT_GUIDANCE:g} for a model trained with condition dropout (train.p_uncond > 0), else off")
    g.add_argument("--batch-size", type=int, default=32, help="images per sampling batch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")


def _guidance(text: str) -> float | str | None:
    if text == AUTO:
        return AUTO
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not s >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the guidance scale must be >= 0")
    return s or None   # 0: off (guidance 0 draws what conditional sampling draws, at twice the cost)


def settings_from_args(ns: argparse.Namespace) -> SamplingSettings:
    def params(s: str) -> SamplingParams:
        t, k, p = getattr(ns, f"{s}_temperature"), getattr(ns, f"{s}_top_k"), getattr(ns, f"{s}_top_p")
        if t < 0 or k < 0 or not 0 < p <= 1:
            raise InputError(f"--{s}-temperature must be >= 0, --{s}-top-k >= 0 and --{s}-top-p in (0, 1]")
        return SamplingParams(temperature=t, top_k=k, top_p=p)
    if ns.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    return SamplingSettings(params("code"), params("pos"), ns.raster, ns.cfg_scale, ns.batch_size,
                            ns.seed, ns.precision)


class ImageGenerator:
    """An exported Stackformer plus its tokenizer, ready to turn conditions into images."""

    def __init__(self, model_dir: str, tokenizer_dir: str, device: str | torch.device | None = None):
        self.device = torch.device(device) if device else default_device()
        self.model, self.run_cfg = STACKFORMER.load(model_dir, self.device)
        self.tokenizer, self.tok_cfg = TOKENIZER.load(tokenizer_dir, self.device)
        self._check_pair(model_dir, tokenizer_dir)

    @classmethod
    def of(cls, model, run_cfg, tokenizer=None, tok_cfg=None, device: str | torch.device | None = None
           ) -> "ImageGenerator":
        """From models in memory (the benchmark: random weights, no export to disk). Without a
        tokenizer only ``tokens`` works."""
        self = cls.__new__(cls)
        self.device = torch.device(device) if device else default_device()
        self.model, self.run_cfg = model.to(self.device).eval(), run_cfg
        self.tokenizer = tokenizer.to(self.device).eval() if tokenizer is not None else None
        self.tok_cfg = tok_cfg
        if tokenizer is not None:
            self._check_pair("the model", "the tokenizer")
        return self

    def _check_pair(self, model_name: str, tokenizer_name: str) -> None:
        m, t = self.run_cfg.model, self.tok_cfg.model
        for what, a, b in (("grid", m.grid, t.grid), ("codebook size", m.codebook_size, t.codebook_size),
                           ("sequence length L", m.seq_len, t.keep)):
            if a != b:
                raise InputError(f"{model_name} ({what} {a}) was not trained on tokens of {tokenizer_name} "
                                f"({what} {b})")

    @property
    def cond_kind(self) -> str:
        return self.run_cfg.model.cond

    def settle(self, settings: SamplingSettings) -> SamplingSettings:
        """``settings`` with "auto" guidance resolved for this model, checked."""
        if settings.guidance == AUTO:
            on = self.cond_kind != "none" and self.run_cfg.train.p_uncond > 0
            settings = dataclasses.replace(settings, guidance=DEFAULT_GUIDANCE if on else None)
        self.check_guidance(settings)
        return settings

    def check_guidance(self, settings: SamplingSettings) -> None:
        if settings.guidance is None:
            return
        if settings.guidance == AUTO:
            raise ValueError("resolve auto guidance first (ImageGenerator.settle)")
        if self.cond_kind == "none":
            raise InputError("--cfg-scale needs a class- or text-conditional model; this one is unconditional")
        if self.run_cfg.train.p_uncond <= 0:
            raise InputError("--cfg-scale: this model was trained without condition dropout "
                            "(train.p_uncond=0), so its null condition is untrained; guidance needs p_uncond > 0")

    def _autocast(self, settings: SamplingSettings):
        bf16 = settings.precision == "bf16" or (settings.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def tokens(self, cond: torch.Tensor | None, n: int, settings: SamplingSettings
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(codes, positions) batches for ``n`` images; ``cond`` holds one condition per image
        (None for an unconditional model). One generator seeded once: same seed, same samples."""
        settings = self.settle(settings)
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
        if self.tokenizer is None:
            raise ValueError("this ImageGenerator has no tokenizer: it makes tokens only")
        for codes, positions in self.tokens(cond, n, settings):
            with self._autocast(settings):
                yield self.tokenizer.decode(codes, positions).float().clamp(-1, 1).cpu()


def training_manifest_meta(gen: ImageGenerator) -> dict | None:
    """The ``meta`` of the manifest of the token shards the model was trained on (its
    ``data.train_url``), or None where there is none to read (no URL, a brace pattern, gone)."""
    d = gen.run_cfg.data
    if not d.train_url or "{" in d.train_url:
        return None
    try:
        return read_manifest(d.train_url, d.storage_options).meta
    except (ManifestError, StorageError, OSError):
        return None


def read_prompts(url: str, storage_options: dict) -> list[str]:
    """Prompts, one per line (blank lines skipped), from a path or fsspec URL."""
    try:
        text = storage.read_bytes(url, storage_options).decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"--prompts {url}: no such file") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {url}: holds no prompt (one per line)")
    return prompts


def text_tokenizer_for(gen: ImageGenerator, spec: str = "", storage_options: dict | None = None):
    """The text tokenizer for a text-conditional model: ``spec`` (``--text-tokenizer``) or, when
    none is given, the one its training shards record; refused unless its identity is the one
    the training manifest records. Why: a different tokenizer maps a prompt to other ids of the
    same range, so a wrong one passes every size check and silently conditions on noise."""
    url = gen.run_cfg.data.train_url
    meta = training_manifest_meta(gen) or {}
    want = meta.get("text_tokenizer") or ""
    recorded = (meta.get("options") or {}).get("text_tokenizer") or ""
    chosen = spec or recorded or "bytes"
    what = (f"--text-tokenizer {spec}" if spec else
            f"the training shards' text tokenizer {recorded} (recorded in {url})" if recorded else
            "the default text tokenizer (bytes)")
    try:
        tok = load_text_tokenizer(chosen, storage_options or gen.run_cfg.data.storage_options)
    except (ValueError, OSError) as e:
        raise InputError(f"{what}: cannot be read ({e})" + ("" if spec else "; pass --text-tokenizer")) from None
    if want and tok.identity != want:
        raise InputError(f"{what} is {tok.identity}, but the model's training shards ({url}) were made with "
                        f"{want}{f' ({recorded})' if recorded else ''}: pass that tokenizer to --text-tokenizer")
    m = gen.run_cfg.model
    if tok.vocab_size > m.text_vocab_size:
        raise InputError(f"{what}: {tok.vocab_size} ids, the model knows {m.text_vocab_size} "
                        f"(model.text_vocab_size); use the tokenizer its shards were made with")
    if not want:
        print(f"note: no training manifest to read at data.train_url={url!r}: {what} ({tok.identity}) "
              "is not checked against the tokenizer the model was trained with", file=sys.stderr)
    return tok


def timed_images(gen: ImageGenerator, cond: torch.Tensor | None, n: int,
                 settings: SamplingSettings) -> tuple[torch.Tensor, float]:
    """All ``n`` images at once, and images/s (sampling + decoding, device synchronised)."""
    t = time.perf_counter()
    out = torch.cat(list(gen.images(cond, n, settings)))
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    return out, n / (time.perf_counter() - t)
