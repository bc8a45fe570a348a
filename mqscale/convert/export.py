"""Exported models: ``model.safetensors`` + ``config.json`` in one directory, self-describing.

Why: exported weights must load anywhere without unpickling (safetensors), and the directory
alone must rebuild its model (the full resolved config rides along). ``config.json`` is written
last, after the weights, each through a temporary name and an atomic rename, so a reader that
finds ``config.json`` finds complete weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mqscale.cli import UserError
from mqscale.config import Config, from_dict, to_dict
from mqscale.models import Stackformer, param_count

FORMAT = "mqscale-stackformer/1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


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


def save_exported(model: Stackformer, cfg: Config, out_dir: str | Path, source: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).unlink(missing_ok=True)  # the old marker goes first: never pair new weights with it
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "param_count": param_count(cfg.model),
        "weights": WEIGHTS,
        "weights_sha256": sha256_file(out / WEIGHTS),
        "source": source,
        "config": to_dict(cfg),
    }
    _atomic_write(out / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  verify: bool = True) -> tuple[Stackformer, Config]:
    d = Path(path)
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{d}: not an exported model (no {CONFIG}; an export writes it last)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    weights = d / meta.get("weights", WEIGHTS)
    if verify and sha256_file(weights) != meta.get("weights_sha256"):
        raise UserError(f"{weights}: sha256 does not match {cfg_path}; the export is damaged")
    cfg = from_dict(meta["config"], str(cfg_path))  # a bad config raises ConfigError naming the file
    model = Stackformer(cfg.model)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not fit the config's model "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), cfg
