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


def consolidate(ckpt: Path) -> dict:
    """fp32 state dict of the Stackformer saved under ``ckpt/<TAG>``."""
    from mqscale.train.checkpoint import TAG
    d = ckpt / TAG
    if any(p.name.startswith("zero_pp_rank_") for p in d.iterdir()) and \
            any("optim_states" in p.name for p in d.iterdir()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    import torch  # ZeRO stage 0: the module's weights sit whole in the model-states file
    # Trust boundary: DeepSpeed model-states files are pickles written by our own training run.
    states = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


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
        sd = consolidate(local)
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
