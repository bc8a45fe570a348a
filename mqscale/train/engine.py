"""The DeepSpeed side of a Stackformer run: its config from ours, the model under ZeRO, the engine.

We set the fields that follow from the run config (batch sizes, accumulation, clipping, ZeRO
stage and offload, precision). An expert may hand over a DeepSpeed JSON of their own
(``deepspeed.config_json``): its other fields are kept, and any field we set that it sets
differently is a ConfigError naming both values, never a silent override. Two kinds of field are
different: tuning knobs we only default (``SOFT``: logging cadence, comm overlap, pinned memory,
the fp16 loss-scale start) take the expert's value; and an ``optimizer`` or ``scheduler`` block
is refused outright, because the optimizer recipe (AdamW, no decay on biases/norms/embeddings)
and the lr schedule (the loop sets every step's lr) come from ``optim.*``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from mqscale.core import dist, storage
from mqscale.core.compiling import inductor_problem
from mqscale.core.config import merged
from mqscale.core.console import quiet_prints
from mqscale.core.errors import CompileError, ConfigError
from mqscale.models.stackformer.model import Stackformer
from mqscale.train.config import Config
from mqscale.train.optim import param_groups

TAG = "ds"  # DeepSpeed's checkpoint tag inside each checkpoint directory


def import_deepspeed():
    """DeepSpeed, with its accelerator stated rather than probed (on a CPU the probe warns in every
    process that it found no GPU)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed  # heavy: training processes only
    return deepspeed


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def grad_accum(cfg: Config, world: int) -> int:
    """Micro-batches per optimizer step: ``train.global_batch`` over micro-batch x world when it is
    set (validate_run has checked that it divides and agrees with ``train.grad_accum``), else
    ``train.grad_accum``."""
    t = cfg.train
    return t.global_batch // (cfg.data.batch_size * world) if t.global_batch else t.grad_accum


def ds_config(cfg: Config, world: int, plan=None, universal: bool = False) -> dict:
    """``plan`` (an ``elastic.BatchPlan``): the micro-batch and accumulation a resumed run keeps
    its global batch with; ``universal``: load a universal checkpoint (another world's ZeRO states)."""
    t, d = cfg.train, cfg.deepspeed
    micro, accum = (plan.micro, plan.accum) if plan is not None else (cfg.data.batch_size, grad_accum(cfg, world))
    zero: dict[str, Any] = {"stage": d.zero_stage, "overlap_comm": d.zero_stage > 0,
                            "contiguous_gradients": d.zero_stage > 0}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer, "pin_memory": True,
                                     **({"nvme_path": d.nvme_path} if d.offload_optimizer == "nvme" else {})}
    if d.offload_param != "none":
        zero["offload_param"] = {"device": d.offload_param, "pin_memory": True,
                                 **({"nvme_path": d.nvme_path} if d.offload_param == "nvme" else {})}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ours = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if universal:
        ours["checkpoint"] = {"load_universal": True}
    if d.offload_optimizer != "none":  # ZeRO-Offload needs DeepSpeed's CPU Adam; same recipe
        o = cfg.optim
        ours["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                         "weight_decay": o.weight_decay}}
    if not d.config_json:
        return ours
    return merge_expert(ours, d.config_json)


# fields we fill in only as defaults: an expert's JSON may set them to anything
SOFT = {"steps_per_print", "wall_clock_breakdown", "zero_optimization.overlap_comm",
        "zero_optimization.contiguous_gradients", "zero_optimization.offload_optimizer.pin_memory",
        "zero_optimization.offload_param.pin_memory", "zero_optimization.stage3_gather_16bit_weights_on_model_save",
        "fp16.loss_scale", "fp16.initial_scale_power"}


def merge_expert(ours: dict, path: str) -> dict:
    try:
        theirs = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_json: {path} not found") from None
    except ValueError as e:
        raise ConfigError(f"deepspeed.config_json: {path} is not JSON ({e})") from None
    if not isinstance(theirs, dict):
        raise ConfigError(f"deepspeed.config_json: {path} must hold a JSON object")
    for block in ("optimizer", "scheduler"):
        if block in theirs:
            raise ConfigError(f"deepspeed.config_json: {path} sets '{block}'; the optimizer and lr schedule come "
                              f"from the run config's optim section (remove '{block}' and set optim.*)")
    a, b = _flatten(ours), _flatten(theirs)
    clash = [f"{k}: ours {a[k]!r} vs {b[k]!r}" for k in sorted(a.keys() & b.keys())
             if a[k] != b[k] and k not in SOFT]
    if clash:
        raise ConfigError(f"deepspeed.config_json: {path} conflicts with the run config on {'; '.join(clash[:3])}")
    return merged(ours, theirs)


def init_weights_zero3(model: Stackformer) -> None:
    """Under ZeRO-3 parameters are partitioned as each submodule is built, before the model's own
    initialisation runs; redo it one module at a time with that module's parameters gathered."""
    deepspeed = import_deepspeed()
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.rank() == 0:
                model.init_module(m)


def build_model(cfg: Config, ds: dict) -> Stackformer:
    torch.manual_seed(cfg.train.seed)
    if cfg.deepspeed.zero_stage == 3:
        with import_deepspeed().zero.Init(config_dict_or_path=ds):
            model = Stackformer(cfg.model)
        init_weights_zero3(model)
        return model
    return Stackformer(cfg.model)


def build_engine(cfg: Config, world: int, plan=None, universal: bool = False):
    """(engine, ds_config): the Stackformer wrapped by DeepSpeed with our optimizer recipe
    (``plan``, ``universal``: see ``ds_config``)."""
    deepspeed = import_deepspeed()
    # adopts the process group Ray Train (or the launcher) already made; ZeRO-3's Init needs it
    with quiet_prints():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    ds = ds_config(cfg, world, plan, universal)
    model = build_model(cfg, ds)
    groups = param_groups(model, cfg.optim.weight_decay)
    if "optimizer" in ds:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    else:
        o = cfg.optim
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **fused_adamw(model))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    compile_engine(engine, cfg)
    return engine, ds


def fused_adamw(model: Stackformer) -> dict:
    """AdamW's one-kernel update where torch has it for the parameters' device (CPU and CUDA):
    DeepSpeed steps the torch optimizer on its own (flat, fp32) tensors, on the same device."""
    device = next(model.parameters()).device.type
    return {"fused": True} if device in ("cpu", "cuda") else {"foreach": True}


def compiled(engine) -> bool:
    """Whether the engine runs its module compiled (``model.compile``)."""
    return bool(getattr(engine, "is_compiled", False))


def compile_engine(engine, cfg: Config) -> bool:
    """``model.compile``: compile the module inside the engine with static shapes (the micro-batch
    and L are fixed), so forward and backward run as inductor graphs; DeepSpeed's hooks (ZeRO's
    gathers, the gradient reduction) stay outside them. True when compiled. Where inductor cannot
    compile, ``true`` is a CompileError naming why and ``auto`` trains eagerly, saying so once."""
    want = cfg.model.compile
    if want is False:
        return False
    problem = inductor_problem(engine.device.type)
    if problem is not None:
        if want is True:
            raise CompileError(f"model.compile: inductor cannot compile on {engine.device.type} here: {problem} "
                               "(model.compile=auto trains eagerly instead)")
        if dist.rank() == 0:
            print(f"note: model.compile=auto: training eagerly, inductor cannot compile here ({problem})")
        return False
    engine.compile(backend="inductor", compile_kwargs={"dynamic": False})
    return True
