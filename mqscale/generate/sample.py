"""python -m mqscale.sample --model EXPORTED --tokenizer TOK (--classes 1,7,9 | --prompts FILE | --unconditional)
    -n N --out URL [sampling options]

Generates images from an exported Stackformer (``mqscale.export``) and the tokenizer whose
tokens it was trained on, and writes a PNG grid to any fsspec URL: one row per class or prompt
with N samples each (unconditional: N samples), rows labelled with the class names when the
training data's class map can be read. ``--per-image`` also writes every image as its own PNG.
Sampling is Algorithm 1 with a KV cache; ``--cfg-scale S`` turns on classifier-free guidance.
Prompts are encoded by the text tokenizer that the training shards' manifest records; one named
with ``--text-tokenizer`` must be that one (same identity), or the run stops with one line.
"""
from __future__ import annotations

import argparse
import math

import torch

from mqscale.core import storage
from mqscale.core.cli import UserError, add_storage_options_arg, guarded
from mqscale.core.errors import ManifestError, StorageError
from mqscale.core.images import grid_png, png_bytes, to_uint8
from mqscale.data.manifest import read_manifest
from mqscale.generate.generator import (
    ImageGenerator,
    add_sampling_args,
    read_prompts,
    settings_from_args,
    text_tokenizer_for,
    timed_images,
)
from mqscale.tokenize.text import encode_batch


def training_classes(gen: ImageGenerator, override: str, storage_options: dict) -> list[str] | None:
    """Class names from ``--class-names`` (a manifest or its directory), or from the manifest of
    the shards the model was trained on; None where neither can be read."""
    url = override or gen.run_cfg.data.train_url
    if not url:
        return None
    try:
        return read_manifest(url, storage_options or gen.run_cfg.data.storage_options).classes
    except (ManifestError, StorageError, OSError):
        if override:
            raise UserError(f"--class-names {override}: no readable manifest there") from None
        return None


def parse_classes(text: str, n_classes: int) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--classes {text!r}: give class ids separated by commas, e.g. 1,7,9") from None
    bad = [i for i in ids if not 0 <= i < n_classes]
    if not ids or bad:
        raise UserError(f"--classes {text!r}: ids must lie in [0, {n_classes}) (bad: {bad})")
    return ids


def conditions(gen: ImageGenerator, ns: argparse.Namespace) -> tuple[torch.Tensor | None, list[str] | None]:
    """(one condition per image, one label per row) for the chosen mode."""
    kind, n = gen.cond_kind, ns.n
    mode = "classes" if ns.classes else "prompts" if ns.prompts else "unconditional"
    need = {"class": "classes", "text": "prompts", "none": "unconditional"}[kind]
    if mode != need:
        raise UserError(f"this model is {kind}-conditional: use --{need}")
    if kind == "none":
        return None, None
    if kind == "class":
        ids = parse_classes(ns.classes, gen.run_cfg.model.n_classes)
        names = training_classes(gen, ns.class_names, ns.storage_options)
        labels = [f"{i}: {names[i]}" if names and i < len(names) else str(i) for i in ids]
        return torch.tensor(ids).repeat_interleave(n), labels
    prompts = read_prompts(ns.prompts, ns.storage_options)
    tok = text_tokenizer_for(gen, ns.text_tokenizer, ns.storage_options)
    ids = torch.from_numpy(encode_batch(tok, prompts, gen.run_cfg.model.text_len)).long()
    return ids.repeat_interleave(n, dim=0), prompts


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported Stackformer directory (python -m mqscale.export)")
    p.add_argument("--tokenizer", required=True, help="exported tokenizer directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--classes", help="class ids, comma-separated (class-conditional models)")
    what.add_argument("--prompts", help="a text file, one prompt per line (text-conditional models)")
    what.add_argument("--unconditional", action="store_true", help="unconditional models")
    p.add_argument("-n", type=int, default=8, help="images per class or prompt (unconditional: in all)")
    p.add_argument("--out", required=True, help="PNG grid: a path or any fsspec URL")
    p.add_argument("--per-image", action="store_true", help="also write each image to <out minus .png>/NNNNNN.png")
    p.add_argument("--class-names", default="", help="manifest giving class names (default: the training data's)")
    p.add_argument("--text-tokenizer", default="", help="bytes, or a tokenizers JSON (default: the one the training "
                   "shards record); refused unless it is the one they were made with")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    add_sampling_args(p)
    add_storage_options_arg(p)
    ns = p.parse_args(argv)
    if ns.n < 1:
        raise UserError("-n must be at least 1")
    gen = ImageGenerator(ns.model, ns.tokenizer, ns.device or None)
    settings = gen.settle(settings_from_args(ns))
    cond, labels = conditions(gen, ns)
    total = ns.n * (len(labels) if labels else 1)
    images, rate = timed_images(gen, cond, total, settings)
    write_outputs(images, labels, ns)
    guided = f", guidance {settings.guidance:g}" if settings.guidance is not None else ""
    print(f"{total} images ({gen.run_cfg.model.seq_len} tokens each{guided}) in {total / rate:.2f}s: "
          f"{rate:.1f} images/s on {gen.device.type} -> {ns.out}")
    return 0


def write_outputs(images: torch.Tensor, labels: list[str] | None, ns: argparse.Namespace) -> None:
    cols = ns.n if labels else max(1, math.isqrt(len(images) - 1) + 1)
    storage.write_bytes(ns.out, grid_png(images, cols, labels), ns.storage_options)
    if ns.per_image:
        stem = ns.out[:-4] if ns.out.endswith(".png") else ns.out
        for i, arr in enumerate(to_uint8(images)):
            storage.write_bytes(storage.join(stem, f"{i:06d}.png"), png_bytes(arr), ns.storage_options)


if __name__ == "__main__":
    raise SystemExit(main())
