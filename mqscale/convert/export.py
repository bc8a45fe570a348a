"""Exported models: ``model.safetensors`` + ``config.json`` in one directory, self-describing.

Why: exported weights must load anywhere without unpickling (safetensors), and the directory
alone must rebuild its model (the full resolved run config rides along). ``config.json`` is
written last, after the weights, each through a temporary name and an atomic rename, so a
reader that finds ``config.json`` finds complete weights. Two kinds exist: Stackformers and MQ-VAE
tokenizers; the weights' sha256 is the model's identity (token shards record the tokenizer's).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from mqscale.cli import UserError
from mqscale.config import from_dict, without_credentials

WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass(frozen=True)
class Kind:
    format: str
    build: Callable[[Any], nn.Module]     # run config -> model
    root: Callable[[], type]              # the run config class


def _stackformer() -> Kind:
    from mqscale.config import Config
    from mqscale.models import Stackformer
    return Kind("mqscale-stackformer/1", lambda c: Stackformer(c.model), lambda: Config)


def _mqvae() -> Kind:
    from mqscale.models.mqvae import MQVAE
    from mqscale.tokenizer_config import TokenizerRunConfig
    return Kind("mqscale-mqvae/1", lambda c: MQVAE(c.model), lambda: TokenizerRunConfig)


KINDS = {"stackformer": _stackformer, "mqvae": _mqvae}


def _kind_of(model: nn.Module) -> Kind:
    from mqscale.models.mqvae import MQVAE
    return _mqvae() if isinstance(model, MQVAE) else _stackformer()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_exported(model: nn.Module, cfg: Any, out_dir: str | Path, source: str = "") -> Path:
    kind = _kind_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).unlink(missing_ok=True)  # the old marker goes first: never pair new weights with it
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": kind.format}))
    meta = {
        "format": kind.format,
        "param_count": sum(p.numel() for p in model.parameters()),
        "weights": WEIGHTS,
        "weights_sha256": sha256_file(out / WEIGHTS),
        "source": source,
        "config": without_credentials(cfg),
    }
    _atomic_write(out / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def read_meta(path: str | Path) -> dict:
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{path}: not an exported model (no {CONFIG}; an export writes it last)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_exported(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
                  expect: str | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, its run config). ``expect``: "stackformer" or "mqvae" to insist on one."""
    d = Path(path)
    meta = read_meta(d)
    kinds = {k: f() for k, f in KINDS.items()}
    kind = next((k for k in kinds.values() if k.format == meta.get("format")), None)
    if kind is None:
        raise UserError(f"{d / CONFIG}: format {meta.get('format')!r} is not one of "
                        f"{sorted(k.format for k in kinds.values())}")
    if expect is not None and kind.format != kinds[expect].format:
        raise UserError(f"{d}: holds a {kind.format} model, not a {kinds[expect].format} one")
    name = meta.get("weights", WEIGHTS)
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise UserError(f"{d / CONFIG}: weights file {name!r} is not a plain file name in the export directory")
    weights = d / name
    if verify and sha256_file(weights) != meta.get("weights_sha256"):
        raise UserError(f"{weights}: sha256 does not match {d / CONFIG}; the export is damaged")
    cfg = from_dict(meta["config"], str(d / CONFIG), root=kind.root())  # bad config: ConfigError naming it
    model = kind.build(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not fit the config's model "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), cfg
