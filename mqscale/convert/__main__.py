"""python -m mqscale.convert {official-stackformer SRC.ckpt OUT_DIR | official-mqvae SRC.ckpt CONFIG.yaml OUT_DIR}"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
import yaml

from mqscale.convert.official import full_config, load_mqvae, load_stackformer
from mqscale.core.cli import guarded
from mqscale.core.config import from_dict, to_dict
from mqscale.core.errors import ConversionError
from mqscale.tokenizer.config import TOKENIZER, TokenizerRunConfig
from mqscale.train.config import STACKFORMER


def load_checkpoint(src: Path, trust_pickle: bool) -> dict:
    """Load a torch checkpoint without unpickling code unless the user vouches for the file."""
    if not src.is_file():
        raise ConversionError(f"{src}: no such checkpoint file")
    try:
        # Trust boundary: full unpickling only when the user passes --trust-pickle for this file.
        obj = torch.load(src, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{src}: holds pickled Python objects beyond tensors ({reason[:160]}); "
                              "it needs trust: rerun with --trust-pickle only if you trust its origin") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConversionError(f"{src}: cannot read as a torch checkpoint ({str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{src}: holds no state dict of tensors")
    return obj


def official_stackformer(ns: argparse.Namespace) -> int:
    sd = load_checkpoint(Path(ns.src), ns.trust_pickle)
    model = load_stackformer(sd, n_classes=ns.n_classes, codebook_size=ns.codebook_size,
                             grid_size=ns.grid_size, n_head=ns.n_head, order=ns.order,
                             seq_len=ns.seq_len)
    cfg = full_config(model.cfg)
    out = STACKFORMER.save(model, cfg, ns.out_dir, source=f"official:{Path(ns.src).name}")
    m = model.cfg
    print(f"converted {ns.src} -> {out}: {m.n_code_layer} code + {m.n_pos_layer} position layers, "
          f"width {m.n_embd}, block {m.block_size}, {sum(p.numel() for p in model.parameters()):,} params")
    return 0


def official_mqvae(ns: argparse.Namespace) -> int:
    sd = load_checkpoint(Path(ns.src), ns.trust_pickle)
    try:
        params = yaml.safe_load(Path(ns.config).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConversionError(f"{ns.config}: cannot read the official YAML ({e})") from None
    model = load_mqvae(sd, params or {})
    run = from_dict({"name": "official-mqvae", "model": to_dict(model.cfg),
                     "data": {"resolution": model.cfg.resolution}}, "official config", TokenizerRunConfig)
    out = TOKENIZER.save(model, run, ns.out_dir, source=f"official:{Path(ns.src).name}")
    c = model.cfg
    print(f"converted {ns.src} -> {out}: {c.resolution}px, f={c.factor}, grid {c.grid}x{c.grid}, keep {c.keep}, "
          f"codebook {c.codebook_size}x{c.codebook_dim}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mqscale.convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("official-stackformer",
                       help="official ReverseStackedPositionGPT (Lightning .ckpt) -> safetensors export")
    s.add_argument("src", help="official checkpoint (.ckpt or a plain state dict)")
    s.add_argument("out_dir", help="output directory (model.safetensors + config.json)")
    s.add_argument("--n-classes", type=int, default=1000)
    s.add_argument("--codebook-size", type=int, default=1024)
    s.add_argument("--grid-size", type=int, default=1024, help="grid cells G (1024 = 32x32)")
    s.add_argument("--n-head", type=int, default=16)
    s.add_argument("--order", choices=["code_first", "pos_first"], default="code_first",
                   help="pos_first reads the official StackedPositionGPT (Stackformer_r)")
    s.add_argument("--seq-len", type=int, required=True,
                   help="L, the kept codes per image of the tokenizer it was trained with (the paper's "
                        "main setting: 256 of 1024); the weights do not record it")
    s.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in SRC (runs code from the file: trust it first)")
    s.set_defaults(func=official_stackformer)
    m = sub.add_parser("official-mqvae", help="official MaskedVectorQuantizationModel (.ckpt + stage-1 YAML) -> export")
    m.add_argument("src", help="official checkpoint (.ckpt or a plain state dict)")
    m.add_argument("config", help="the official stage-1 YAML (model.params with the five *_config entries)")
    m.add_argument("out_dir", help="output directory (model.safetensors + config.json)")
    m.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in SRC (runs code from the file: trust it first)")
    m.set_defaults(func=official_mqvae)
    return p


@guarded
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    raise SystemExit(main())
