"""python -m mqscale.export RUN_OR_CHECKPOINT OUT_DIR [--storage-options JSON]

Consolidates a training checkpoint (any ZeRO stage; ZeRO-3 shards gathered) into one
``model.safetensors`` + ``config.json``, what sampling and evaluation load. Given a run directory
it takes the newest checkpoint that verifies; given a checkpoint it verifies that one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mqscale.core import storage
from mqscale.core.checkpoint import MARKER, CheckpointStore
from mqscale.core.cli import add_storage_options_arg, guarded
from mqscale.core.config import from_dict
from mqscale.core.console import quiet_prints
from mqscale.core.errors import CheckpointError
from mqscale.core.session import scratch_dir
from mqscale.models.stackformer.model import Stackformer
from mqscale.train.config import STACKFORMER, Config
from mqscale.train.engine import TAG, import_deepspeed
from mqscale.train.optim import param_groups
from mqscale.train.trainer import RUN_CONFIG


def consolidate(ckpt: Path, model) -> dict:
    """fp32 state dict of the Stackformer saved under ``ckpt/<TAG>``, from the fp32 master weights
    wherever the run kept them (bf16/fp16 training: the module itself holds only rounded copies).

    ZeRO 1-3 leave per-rank optimizer files: ``zero_pp_rank_*`` (fp32) or ``bf16_zero_pp_rank_*``
    (bf16), which DeepSpeed's zero_to_fp32 gathers. ZeRO-0 keeps one model-states file whose
    optimizer entry holds the masters of a bf16 (``fp32_groups``) or fp16 (``fp32_groups_flat``) run,
    in the order of ``param_groups``; an fp32 run's module weights are the masters."""
    d = ckpt / TAG
    names = [p.name for p in d.iterdir()]
    if any("zero_pp_rank_" in n and n.endswith("optim_states.pt") for n in names):
        import_deepspeed()   # its accelerator stated, not probed
        # deepspeed: heavy; only ZeRO 1-3 checkpoints need it
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with quiet_prints():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    # Trust boundary: DeepSpeed model-states files are pickles written by our own training run.
    states = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    sd = {k: v.float() for k, v in states["module"].items()}
    opt = states.get("optimizer") or {}
    if "fp32_groups" in opt or "fp32_groups_flat" in opt:
        sd.update(_zero0_masters(opt, model))
    return sd


def _zero0_masters(opt: dict, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [g["params"] for g in param_groups(model, 0.0)]
    if "fp32_groups" in opt:
        masters = [list(g) for g in opt["fp32_groups"]]
    else:  # fused fp16 optimizer: one flat fp32 tensor per group, the params in order
        masters = [list(torch.split(flat, [p.numel() for p in ps])) for flat, ps in zip(opt["fp32_groups_flat"], groups)]
    out = {}
    for ps, ms in zip(groups, masters, strict=True):
        for p, m in zip(ps, ms, strict=True):
            if m.numel() != p.numel():
                raise CheckpointError(f"optimizer masters do not fit the model: {names[id(p)]} has {p.numel()} "
                                f"elements, its master {m.numel()}")
            out[names[id(p)]] = m.detach().float().view(p.shape).clone()
    return out


def export(src: str, out: str, storage_options: dict | None = None) -> Path:
    """Export the checkpoint ``src`` (or a run's newest verified one) to ``out``; returns ``out``."""
    storage_options = storage_options or {}
    store = CheckpointStore(src, storage_options)
    if storage.exists(storage.join(src, MARKER), storage_options):
        found = store.open_url(src)
    else:
        found = store.latest_valid()
        if found is None:
            raise CheckpointError(f"{src}: no verified checkpoint (neither a checkpoint nor a run directory with one)")
    with scratch_dir("mqscale-export-") as tmp:
        local = store.download(found, tmp)
        cfg = from_dict(json.loads((local / RUN_CONFIG).read_text()), f"{found.url}/{RUN_CONFIG}", Config)
        model = Stackformer(cfg.model)
        sd = consolidate(local, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{found.url}: weights do not fit the saved config (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        return STACKFORMER.save(model, cfg, out, source=f"{found.url} (step {found.step})")


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a run directory (newest verified checkpoint) or one checkpoint directory")
    p.add_argument("out", help="output directory (model.safetensors + config.json)")
    add_storage_options_arg(p)
    ns = p.parse_args(argv)
    out = export(ns.src, ns.out, ns.storage_options)
    print(f"exported {ns.src} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
