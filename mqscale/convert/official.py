"""Import Stackformers trained with the official code (CrossmodalGroup/MaskedVectorQuantization).

The reference is ``ReverseStackedPositionGPT`` (the paper's code-first Stackformer; "value"
means code there), fed as in ``stackformer_class.py``: idx = [class, codes + n_classes] over one
shared table, pos_idx = [sos = grid_size, positions]. Its pieces map onto ours as:

    value_emb[:n_classes]      -> cond_emb        value_emb[n_classes:]     -> code_emb
    value_pos_emb              -> pos_emb         pos_emb[0]                -> abs_emb
    value_transformer.i        -> code_transformer.blocks.i  (key/query/value fused into qkv)
    position_transformer.i     -> pos_transformer.blocks.i
    value_head.1[n_classes:]   -> code_head       position_head.1[:grid_size] -> pos_head

Dropping the class rows of the code head and the SOS row of the position head changes nothing
the model can emit: the official sampler masks those entries out anyway. Our class table has one
row more, the null class of classifier-free guidance, which the official model never learned: it
is set to the mean class embedding, and guidance with an imported model needs fine-tuning with
``train.p_uncond`` first.
"""
from __future__ import annotations

import math
import re

import torch

from mqscale.convert.official_mqvae import load_mqvae
from mqscale.core.config import from_dict, to_dict
from mqscale.core.errors import ConversionError
from mqscale.models.stackformer.args import ModelConfig
from mqscale.models.stackformer.model import Stackformer
from mqscale.train.config import Config

__all__ = ["load_stackformer", "load_mqvae", "official_model_config", "convert_state_dict", "full_config"]

PREFIX = "transformer."
_BLOCK = re.compile(r"^(value|position)_transformer\.(\d+)\.")
_BLOCK_MAP = {  # official name -> ours, inside a block
    "ln1": "ln1", "ln2": "ln2", "attn.proj": "attn.proj", "mlp.0": "mlp.fc", "mlp.2": "mlp.out",
}


def strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's own keys, with or without the Lightning ``transformer.`` prefix."""
    if any(k.startswith(PREFIX) for k in state_dict):
        return {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    return dict(state_dict)


def _layers(sd: dict, stack: str) -> int:
    idx = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == stack}
    if idx != set(range(len(idx))):
        raise ConversionError(f"official state dict: {stack}_transformer blocks are not numbered 0..n-1")
    return len(idx)


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"official state dict: missing {key!r} (is this an official Stackformer?)")
    return sd[key]


def official_model_config(sd: dict, *, n_classes: int, codebook_size: int, grid_size: int,
                          n_head: int, order: str = "code_first", seq_len: int | None = None,
                          dropout: float = 0.1) -> ModelConfig:
    """Infer depth, width and block size from the weights; the rest comes from the caller."""
    side = math.isqrt(grid_size)
    if side * side != grid_size:
        raise ConversionError(f"grid_size {grid_size} is not a square grid's cell count (e.g. 1024 = 32x32)")
    value_emb = _need(sd, "value_emb.weight")
    pos_table = _need(sd, "value_pos_emb.weight")
    if value_emb.shape[0] != n_classes + codebook_size:
        raise ConversionError(f"official value_emb has {value_emb.shape[0]} rows, not n_classes + "
                        f"codebook_size = {n_classes} + {codebook_size}")
    if pos_table.shape[0] != grid_size + 1:
        raise ConversionError(f"official value_pos_emb has {pos_table.shape[0]} rows, not grid_size + 1 "
                        f"= {grid_size + 1}")
    n_embd = value_emb.shape[1]
    abs_pos = "pos_emb" in sd
    block_size = sd["pos_emb"].shape[1] if abs_pos else grid_size
    data = {"model": dict(
        order=order, n_code_layer=_layers(sd, "value"), n_pos_layer=_layers(sd, "position"),
        n_embd=n_embd, n_head=n_head, dropout=dropout, codebook_size=codebook_size, grid=side,
        seq_len=seq_len or min(block_size, grid_size), block_size=block_size, cond="class",
        n_classes=n_classes, abs_pos=abs_pos)}
    return from_dict(data, "official checkpoint", Config).model


def convert_state_dict(sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    n_cls, G = cfg.n_classes, cfg.n_positions
    value_emb = sd["value_emb.weight"]
    out = {
        "cond_emb.weight": torch.cat([value_emb[:n_cls], value_emb[:n_cls].mean(0, keepdim=True)]),
        "code_emb.weight": value_emb[n_cls:],
        "pos_emb.weight": sd["value_pos_emb.weight"],
        "code_head.ln.weight": _need(sd, "value_head.0.weight"),
        "code_head.ln.bias": _need(sd, "value_head.0.bias"),
        "code_head.proj.weight": _need(sd, "value_head.1.weight")[n_cls:],
        "pos_head.ln.weight": _need(sd, "position_head.0.weight"),
        "pos_head.ln.bias": _need(sd, "position_head.0.bias"),
        "pos_head.proj.weight": _need(sd, "position_head.1.weight")[:G],
    }
    if cfg.abs_pos:
        out["abs_emb.weight"] = sd["pos_emb"][0]
    used = {"value_emb.weight", "value_pos_emb.weight", "pos_emb", "value_head.0.weight",
            "value_head.0.bias", "value_head.1.weight", "position_head.0.weight",
            "position_head.0.bias", "position_head.1.weight"}
    for stack, ours, n in (("value", "code_transformer", cfg.n_code_layer),
                           ("position", "pos_transformer", cfg.n_pos_layer)):
        for i in range(n):
            src, dst = f"{stack}_transformer.{i}.", f"{ours}.blocks.{i}."
            for kind in ("weight", "bias"):
                qkv = [_need(sd, f"{src}attn.{p}.{kind}") for p in ("query", "key", "value")]
                out[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
                used |= {f"{src}attn.{p}.{kind}" for p in ("query", "key", "value")}
                for a, b in _BLOCK_MAP.items():
                    out[f"{dst}{b}.{kind}"] = _need(sd, f"{src}{a}.{kind}")
                    used.add(f"{src}{a}.{kind}")
            used.add(f"{src}attn.mask")  # the official causal-mask buffer: we never store one
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ConversionError(f"official state dict has keys this converter does not know: {unknown[:4]}")
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def load_stackformer(state_dict: dict[str, torch.Tensor], *, n_classes: int, codebook_size: int,
                     grid_size: int, n_head: int, order: str = "code_first",
                     seq_len: int | None = None) -> Stackformer:
    """A ready (eval-mode) Stackformer from an official state dict.

    ``grid_size`` is the number of grid cells G (1024 for 32x32), the official SOS position id.
    ``order="pos_first"`` reads the official ``StackedPositionGPT`` (Stackformer_r) instead.
    """
    sd = strip_prefix(state_dict)
    cfg = official_model_config(sd, n_classes=n_classes, codebook_size=codebook_size,
                                grid_size=grid_size, n_head=n_head, order=order, seq_len=seq_len)
    model = Stackformer(cfg)
    model.load_state_dict(convert_state_dict(sd, cfg), strict=True)
    return model.eval()


def full_config(model_cfg: ModelConfig, name: str = "official-stackformer") -> Config:
    return from_dict({"name": name, "model": to_dict(model_cfg)}, "official checkpoint", Config)
