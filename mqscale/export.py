"""python -m mqscale.export RUN_OR_CHECKPOINT OUT_DIR [--storage-options JSON]

Consolidates a training checkpoint (any ZeRO stage; ZeRO-3 shards gathered) into one
``model.safetensors`` + ``config.json``, what sampling and evaluation load. Given a run directory
it takes the newest checkpoint that verifies; given a checkpoint it verifies that one.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mqscale.cli import UserError, add_storage_options_arg, guarded


def consolidate(ckpt: Path, model) -> dict:
    """fp32 state dict of the Stackformer saved under ``ckpt/<TAG>``, from the fp32 master weights
    wherever the run kept them (bf16/fp16 training: the module itself holds only rounded copies).

    ZeRO 1-3 leave per-rank optimizer files: ``zero_pp_rank_*`` (fp32) or ``bf16_zero_pp_rank_*``
    (bf16), which DeepSpeed's zero_to_fp32 gathers. ZeRO-0 keeps one model-states file whose
    optimizer entry holds the masters of a bf16 (``fp32_groups``) or fp16 (``fp32_groups_flat``) run,
    in the order of ``param_groups``; an fp32 run's module weights are the masters."""
    from mqscale.train.checkpoint import TAG
    d = ckpt / TAG
    names = [p.name for p in d.iterdir()]
    if any("zero_pp_rank_" in n and n.endswith("optim_states.pt") for n in names):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    import torch
    # Trust boundary: DeepSpeed model-states files are pickles written by our own training run.
    states = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    sd = {k: v.float() for k, v in states["module"].items()}
    opt = states.get("optimizer") or {}
    if "fp32_groups" in opt or "fp32_groups_flat" in opt:
        sd.update(_zero0_masters(opt, model))
    return sd


def _zero0_masters(opt: dict, model) -> dict:
    import torch

    from mqscale.train.optim import param_groups
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
                raise UserError(f"optimizer masters do not fit the model: {names[id(p)]} has {p.numel()} "
                                f"elements, its master {m.numel()}")
            out[names[id(p)]] = m.detach().float().view(p.shape).clone()
    return out


def export(src: str, out: str, storage_options: dict | None = None) -> Path:
    from mqscale.config import from_dict
    from mqscale.convert.export import save_exported
    from mqscale.models import Stackformer
    from mqscale.train.checkpoint import MARKER, RUN_CONFIG, CheckpointStore

    so = storage_options or {}
    store = CheckpointStore(src, so)
    from mqscale.data import fs
    if fs.exists(fs.join(src, MARKER), so):
        found = store.open_url(src)
    else:
        found = store.latest_valid()
        if found is None:
            raise UserError(f"{src}: no verified checkpoint (neither a checkpoint nor a run directory with one)")
    with tempfile.TemporaryDirectory(prefix="mqscale-export-") as tmp:
        local = store.download(found, Path(tmp))
        cfg = from_dict(json.loads((local / RUN_CONFIG).read_text()), f"{found.url}/{RUN_CONFIG}")
        model = Stackformer(cfg.model)
        sd = consolidate(local, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"{found.url}: weights do not fit the saved config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        return save_exported(model, cfg, out, source=f"{found.url} (step {found.step})")


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
