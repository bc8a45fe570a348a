"""Exported models: ``model.safetensors`` + ``config.json`` in one directory, self-describing.

Why: exported weights must load anywhere without unpickling (safetensors), and the directory
alone must rebuild its model (the full resolved run config rides along, credentials left out).
``config.json`` is written last, after the weights, each through a temporary name and an atomic
rename, so a reader that finds ``config.json`` finds complete weights. The weights' sha256 is
the model's identity (token shards record the tokenizer's). Each kind names its format and the
run config its ``config.json`` holds: ``train.config.STACKFORMER`` and ``tokenizer.config.TOKENIZER``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from mqscale.core import storage
from mqscale.core.config import from_dict
from mqscale.core.errors import ArtifactError
from mqscale.core.secrets import without_credentials

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def read_meta(path: str | Path) -> dict:
    """The ``config.json`` of an exported model (any kind)."""
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        raise ArtifactError(f"{path}: not an exported model (no {CONFIG}; an export writes it last)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of exported model: its format string, its run config class, and how to build it."""
    format: str                            # e.g. "mqscale-stackformer/1"
    config: type                           # the run config class its config.json holds
    build: Callable[[Any], nn.Module]      # run config -> model
    name: str                              # what a person calls it: "a Stackformer", "an MQ-VAE tokenizer"

    def save(self, model: nn.Module, cfg: Any, out_dir: str | Path, source: str = "") -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).unlink(missing_ok=True)  # the old marker goes first: never pair new weights with it
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        with storage.atomic_path(out / WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": self.format})
        meta = {"format": self.format, "param_count": sum(p.numel() for p in model.parameters()),
                "weights": WEIGHTS, "weights_sha256": storage.sha256_file(out / WEIGHTS), "source": source,
                "config": without_credentials(cfg)}
        with storage.atomic_path(out / CONFIG) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
        return out

    def meta(self, path: str | Path) -> dict:
        """``config.json`` of an export of this kind (ArtifactError for another kind)."""
        meta = read_meta(path)
        if meta.get("format") != self.format:
            raise ArtifactError(f"{path}: holds a {meta.get('format')!r} model, not {self.name} ({self.format})")
        return meta

    def load(self, path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> tuple[nn.Module, Any]:
        """(model in eval mode, its run config); the weights checked against their sha256."""
        d = Path(path)
        meta = self.meta(d)
        name = meta.get("weights", WEIGHTS)
        if not isinstance(name, str) or "/" in name or storage.unsafe_name(name) or name in (".", ".."):
            raise ArtifactError(f"{d / CONFIG}: weights file {name!r} is not a plain file name in the export directory")
        weights = d / name
        if verify and storage.sha256_file(weights) != meta.get("weights_sha256"):
            raise ArtifactError(f"{weights}: sha256 does not match {d / CONFIG}; the export is damaged")
        cfg = from_dict(meta["config"], str(d / CONFIG), self.config)  # bad config: ConfigError naming it
        model = self.build(cfg)
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise ArtifactError(f"{weights}: weights do not fit the config's model "
                                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        return model.to(device).eval(), cfg
