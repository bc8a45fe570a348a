"""Import MQ-VAE tokenizers trained with the official code (``MaskedVectorQuantizationModel``).

``config`` is the official stage-1 YAML's ``model.params`` (``encoder_config``,
``decoder_config``, ``masker_config``, ``demasker_config``, ``vqconfig``, each with ``params``);
other entries (``lossconfig``, ...) are ignored, as are the loss/discriminator weights. The
encoder and decoder keep taming's names; the rest maps as:

    masker.score_pred_net.*                   -> masker.score_net.*
    demasker.mask_token [1, d, 1]             -> demasker.mask_token [d]
    demasker.transformer.blocks.i.{attn,resblock} -> demasker.layers.i.{attn,resblock}
    demasker.transformer.last_resblock        -> demasker.last_resblock
    quantize.codebook.weight[:K] (row K pads) -> quantize.embed
    quantize.codebook.{cluster_size_ema, embed_ema} -> quantize.{cluster_size, embed_sum}

The de-masker's ResNet blocks carry an unused ``temb_proj`` in the official code; it is dropped.
"""
from __future__ import annotations

import re

import torch

from mqscale.core.config import from_dict
from mqscale.core.errors import ConversionError
from mqscale.models.mqvae.args import MQVAEConfig
from mqscale.models.mqvae.model import MQVAE
from mqscale.tokenizer.config import TokenizerRunConfig

_RULES = [
    (re.compile(r"^masker\.score_pred_net\."), "masker.score_net."),
    (re.compile(r"^demasker\.transformer\.blocks\.(\d+)\."), r"demasker.layers.\1."),
    (re.compile(r"^demasker\.transformer\.last_resblock\."), "demasker.last_resblock."),
]
_DROP = re.compile(r"(^loss\.|\.temb_proj\.)")


def _params(config: dict, name: str) -> dict:
    try:
        p = config[name]["params"]
    except (KeyError, TypeError):
        raise ConversionError(f"official config: missing {name}.params") from None
    if not isinstance(p, dict):
        raise ConversionError(f"official config: {name}.params is not a mapping")
    return p


def official_mqvae_config(config: dict) -> MQVAEConfig:
    if "model" in config and "params" in config.get("model", {}):
        config = config["model"]["params"]
    enc, dec = _params(config, "encoder_config"), _params(config, "decoder_config")
    msk, dem, vq = (_params(config, k) for k in ("masker_config", "demasker_config", "vqconfig"))
    for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution"):
        if list(map(int, _as_list(enc.get(k)))) != list(map(int, _as_list(dec.get(k)))):
            raise ConversionError(f"official config: encoder and decoder differ in {k} "
                            f"({enc.get(k)} vs {dec.get(k)}); mqscale builds them from one setting")
    if enc.get("double_z", False):
        raise ConversionError("official config: encoder double_z=true is not an MQ-VAE encoder")
    data = {"model": {
        "resolution": int(enc["resolution"]), "in_channels": int(enc.get("in_channels", 3)),
        "ch": int(enc["ch"]), "ch_mult": [int(m) for m in enc["ch_mult"]],
        "num_res_blocks": int(enc["num_res_blocks"]),
        "attn_resolutions": [int(r) for r in enc.get("attn_resolutions", [])],
        "z_channels": int(enc["z_channels"]), "dropout": float(enc.get("dropout", 0.0)),
        "mask_ratio": float(msk["topk_ratio"]), "mask_type": "adaptive",
        "codebook_size": int(vq["codebook_size"]), "codebook_dim": int(vq["codebook_dim"]),
        "ema_decay": float(vq.get("decay", 0.99)), "commitment_beta": float(vq.get("commitment_beta", 0.25)),
        "restart_unused": bool(vq.get("restart_unused_codes", True)),
        "demask_layers": int(dem["n_layer"]), "mask_init": float(dem.get("mask_init_value", 0.02)),
    }, "data": {"resolution": int(enc["resolution"])}}
    cfg = from_dict(data, "official config", TokenizerRunConfig).model
    checks = [("masker input_token_num", int(msk["input_token_num"]), cfg.grid ** 2),
              ("masker input_dim", int(msk["input_dim"]), cfg.latent_channels),
              ("masker codebook_dim", int(msk.get("codebook_dim", cfg.codebook_dim)), cfg.codebook_dim),
              ("demasker codebook_dim", int(dem["codebook_dim"]), cfg.codebook_dim),
              ("demasker output_dim", int(dem["output_dim"]), cfg.feature_channels),
              ("demasker height_and_width", int(dem["height_and_width"]), cfg.grid)]
    for what, got, want in checks:
        if got != want:
            raise ConversionError(f"official config: {what} is {got}, the encoder implies {want}")
    return cfg


def _as_list(v):
    return v if isinstance(v, (list, tuple)) else [v]


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: MQVAEConfig) -> dict[str, torch.Tensor]:
    if any(k.startswith("state_dict.") for k in sd):
        sd = {k[len("state_dict."):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if _DROP.search(k):
            continue
        if k == "demasker.mask_token":
            out[k] = v.reshape(-1)
            continue
        if k.startswith("quantize.codebook."):
            name = k.rsplit(".", 1)[1]
            if name == "weight":
                out["quantize.embed"] = v[: cfg.codebook_size]
            elif name == "cluster_size_ema":
                out["quantize.cluster_size"] = v
            elif name == "embed_ema":
                out["quantize.embed_sum"] = v
            else:
                raise ConversionError(f"official state dict: unknown quantizer key {k!r}")
            continue
        for pat, rep in _RULES:
            k = pat.sub(rep, k)
        out[k] = v
    return {k: v.detach().clone() for k, v in out.items()}


def load_mqvae(state_dict: dict[str, torch.Tensor], config: dict) -> MQVAE:
    """A ready (eval-mode) MQ-VAE from an official state dict and its stage-1 config."""
    cfg = official_mqvae_config(config)
    model = MQVAE(cfg)
    missing, unexpected = model.load_state_dict(convert_state_dict(state_dict, cfg), strict=False)
    if missing or unexpected:
        raise ConversionError(f"official MQ-VAE state dict does not fit its config: missing {sorted(missing)[:4]}, "
                        f"unexpected {sorted(unexpected)[:4]}")
    return model.eval()
