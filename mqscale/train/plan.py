"""python -m mqscale.plan --config CONFIG --gpus N --gpu-mem-gb 80 [--nodes M] [--json]

Before renting a cluster: how big is the model, what does one token cost, which ZeRO setup fits
on the GPUs at hand, and how long will an epoch take. ``--gpus`` is GPUs per node (DeepSpeed's
``num_gpus_per_node``); the world is gpus x nodes.

Model states use DeepSpeed's own accounting (``estimate_zero2/3_model_states_mem_needs``), so the
figures agree with its estimators, extended to ZeRO-0/1 the same way. Bytes per parameter with
AdamW in bf16 mixed precision: 16-bit weights 2, 16-bit gradients 2, fp32 gradients 4, fp32
master weights 4, Adam moments 8.

    ZeRO-0   2 + 2 + 16                      every rank holds everything
    ZeRO-1   2 + 2 + 16/N                    optimizer state partitioned
    ZeRO-2   2 + 18/N                        + gradients partitioned
    ZeRO-3   18/N + 4 x largest layer        + weights partitioned, gathered a layer at a time
    offload  optimizer states and fp32 copies go to CPU; with ZeRO-3 the weights too

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): 34 bytes per token per width unit per layer in 16-bit, with no s x s
score term because SDPA's flash/memory-efficient kernels never materialize it. With activation
checkpointing a layer keeps only its 16-bit input (2 bytes), plus one layer's full activations
while it is recomputed. The two heads' logits add 10 bytes per logit (bf16 logits, fp32
log-softmax and its gradient). A fixed ``--reserve-gb`` covers the CUDA context, NCCL buffers
and allocator fragmentation.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from mqscale.core.cli import UserError, add_config_args, config_from_args, guarded
from mqscale.models.stackformer.args import ModelConfig
from mqscale.models.stackformer.counting import param_count, train_flops_per_token
from mqscale.train.config import Config
from mqscale.train.metrics import PEAK_BF16_TFLOPS

GB = 2 ** 30
IMAGENET_TRAIN = 1_281_167


@dataclass
class Setup:
    zero: int
    offload: str          # none | optimizer | optimizer+params
    checkpointing: bool

    @property
    def label(self) -> str:
        off = "" if self.offload == "none" else f" + offload {self.offload}"
        return f"ZeRO-{self.zero}{off}" + (" + act. ckpt" if self.checkpointing else "")


# the order in which setups are tried: least communication and recomputation first
LADDER = [Setup(z, o, c) for c in (False, True)
          for z, o in ((0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"),
                       (3, "optimizer"), (3, "optimizer+params"))]


def largest_layer_params(m: ModelConfig) -> int:
    """The most parameters any one module holds itself (what ZeRO-3 gathers at once)."""
    c = m.n_embd
    n_cond = {"class": m.n_classes, "text": m.text_vocab_size, "none": 1}[m.cond]
    return max(4 * c * c + 4 * c,                    # an MLP's up-projection
               m.codebook_size * c + c,              # the code head's projection
               m.n_positions * c + c,                # the position head's projection
               (m.n_positions + 1) * c, n_cond * c,  # embeddings
               m.resolved_block_size * c if m.abs_pos else 0)


def model_state_bytes(params: int, largest: int, zero: int, offload: str, world: int) -> float:
    """Per-GPU bytes of weights, gradients and optimizer states (DeepSpeed's accounting)."""
    n = world
    if offload == "none":
        return {0: 20.0 * params, 1: 4.0 * params + 16.0 * params / n, 2: 2.0 * params + 18.0 * params / n,
                3: 4.0 * largest + 18.0 * params / n}[zero]
    if zero == 2:                                   # ZeRO-Offload: only the 16-bit weights stay
        return 2.0 * params
    if offload == "optimizer":
        return 4.0 * largest + 2.0 * params / n
    return 4.0 * largest                            # ZeRO-Infinity: weights stream in by layer


def cpu_state_bytes(params: int, zero: int, offload: str, gpus_per_node: int, nodes: int) -> float:
    """Per-node CPU bytes for offloaded states (DeepSpeed's accounting, its 1.5 buffer factor)."""
    if offload == "none":
        return 0.0
    if zero == 2:
        return params * max(4 * gpus_per_node * nodes, 16) * 1.5
    return params * (16 if offload == "optimizer" else 18) / nodes * 1.5


def activation_bytes(cfg: Config, checkpointing: bool) -> float:
    m, b = cfg.model, cfg.data.batch_size
    c = m.n_embd
    t_first, t_second = m.prefix_len + m.seq_len - 1, m.seq_len
    n_first, n_second = ((m.n_code_layer, m.n_pos_layer) if m.order == "code_first"
                         else (m.n_pos_layer, m.n_code_layer))
    full = lambda t: 34.0 * t * b * c  # noqa: E731  one layer, 16-bit, no s x s term (SDPA)
    if checkpointing:
        layers = 2.0 * c * b * (n_first * t_first + n_second * t_second) + max(full(t_first), full(t_second))
    else:
        layers = n_first * full(t_first) + n_second * full(t_second)
    logits = 10.0 * b * m.seq_len * (m.codebook_size + m.n_positions)
    return layers + logits


@dataclass
class Row:
    setup: str
    zero: int
    offload: str
    activation_checkpointing: bool
    model_states_gb: float
    activations_gb: float
    total_gb: float
    cpu_per_node_gb: float
    fits: bool


def plan(cfg: Config, gpus: int, gpu_mem_gb: float, nodes: int = 1, mfu: float = 0.4,
         peak_tflops: float = 989.0, dataset_images: int = IMAGENET_TRAIN, reserve_gb: float = 3.0) -> dict:
    m = cfg.model
    world = gpus * nodes
    params, largest = param_count(m), largest_layer_params(m)
    rows = []
    for s in LADDER:
        states = model_state_bytes(params, largest, s.zero, s.offload, world) / GB
        acts = activation_bytes(cfg, s.checkpointing) / GB
        total = states + acts + reserve_gb
        rows.append(Row(s.label, s.zero, s.offload, s.checkpointing, round(states, 3), round(acts, 3),
                        round(total, 3), round(cpu_state_bytes(params, s.zero, s.offload, gpus, nodes) / GB, 1),
                        total <= gpu_mem_gb))
    fitting = next((r for r in rows if r.fits), None)
    flops = train_flops_per_token(m)
    tokens_per_s = mfu * peak_tflops * 1e12 * world / flops
    tokens_per_epoch = dataset_images * m.seq_len
    return {
        "config": cfg.name, "params": params, "largest_layer_params": largest,
        "train_flops_per_token": flops, "world": world, "gpus_per_node": gpus, "nodes": nodes,
        "gpu_mem_gb": gpu_mem_gb, "reserve_gb": reserve_gb, "micro_batch": cfg.data.batch_size,
        "seq_len": m.seq_len, "setups": [asdict(r) for r in rows],
        "smallest_fit": fitting.setup if fitting else None,
        "assumed_mfu": mfu, "peak_tflops": peak_tflops, "tokens_per_s": tokens_per_s,
        "dataset_images": dataset_images, "days_per_epoch": tokens_per_epoch / tokens_per_s / 86400,
    }


def render(p: dict) -> str:
    out = [f"{p['config']}: {p['params'] / 1e6:,.1f}M parameters, {p['train_flops_per_token'] / 1e9:.2f} GFLOP "
           f"per token (train), micro-batch {p['micro_batch']} x L={p['seq_len']}",
           f"{p['world']} GPUs ({p['nodes']} node(s) x {p['gpus_per_node']}), {p['gpu_mem_gb']:g} GB each "
           f"({p['reserve_gb']:g} GB reserved)", "",
           f"{'setup':<48}{'states GB':>10}{'acts GB':>9}{'total GB':>10}{'CPU/node GB':>13}  fits"]
    for r in p["setups"]:
        out.append(f"{r['setup']:<48}{r['model_states_gb']:>10.2f}{r['activations_gb']:>9.2f}"
                   f"{r['total_gb']:>10.2f}{r['cpu_per_node_gb']:>13.1f}  {'yes' if r['fits'] else 'no'}")
    out += ["", f"smallest setup that fits: {p['smallest_fit'] or 'none (more GPUs, or a smaller micro-batch)'}",
            f"at {100 * p['assumed_mfu']:.0f}% MFU of {p['peak_tflops']:g} TFLOP/s per GPU: "
            f"{p['tokens_per_s']:,.0f} tokens/s, {p['days_per_epoch']:.4f} days ({24 * p['days_per_epoch']:.2f} h) per epoch of "
            f"{p['dataset_images']:,} images"]
    return "\n".join(out)


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default="configs/stackformer/307m.yaml")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default %(default)s)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default %(default)s)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default %(default)s)")
    p.add_argument("--gpu", default="H100", help=f"peak from the table: {', '.join(PEAK_BF16_TFLOPS)}")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; overrides --gpu")
    p.add_argument("--dataset-images", type=int, default=IMAGENET_TRAIN, help="images per epoch (ImageNet)")
    p.add_argument("--reserve-gb", type=float, default=3.0, help="per-GPU memory kept free (context, NCCL)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = p.parse_args(argv)
    if ns.gpus < 1 or ns.nodes < 1 or ns.gpu_mem_gb <= 0 or not 0 < ns.mfu <= 1:
        raise UserError("--gpus and --nodes must be >= 1, --gpu-mem-gb > 0, --mfu in (0, 1]")
    peak = ns.peak_tflops or PEAK_BF16_TFLOPS.get(ns.gpu)
    if not peak:
        raise UserError(f"--gpu {ns.gpu}: not in the table ({', '.join(PEAK_BF16_TFLOPS)}); give --peak-tflops")
    cfg = config_from_args(ns, Config)
    result = plan(cfg, ns.gpus, ns.gpu_mem_gb, ns.nodes, ns.mfu, peak, ns.dataset_images, ns.reserve_gb)
    print(json.dumps(result, indent=1) if ns.json else render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
