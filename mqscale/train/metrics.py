"""Training metrics beyond the losses: throughput and MFU, memory, and the one console line per log step.

MFU = achieved model FLOP/s / (peak FLOP/s x world), with the model's FLOPs counted analytically
(``mqscale.models.counting``) and the peak from ``logging.peak_tflops`` or a table of dense bf16
datasheet figures for known GPUs.
"""
from __future__ import annotations

import logging
import resource

import torch

log = logging.getLogger("mqscale.train")

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets; matched
# against torch.cuda.get_device_name() in this order, so longer names come before their prefixes
PEAK_BF16_TFLOPS = {"GH200": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "H800 PCIe": 756.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "V100": 125.0}


def device_peak_tflops(override: float = 0.0) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


class Metrics:
    def __init__(self, rank: int, flops_per_token: float, peak_tflops: float | None, world: int):
        self.rank, self.world = rank, world
        self.flops, self.peak = flops_per_token, peak_tflops

    def throughput(self, tokens_per_s: float) -> dict[str, float]:
        out = {"perf/tokens_per_s": tokens_per_s,
               "perf/model_tflops_per_worker": tokens_per_s * self.flops / self.world / 1e12}
        if self.peak:
            out["perf/mfu"] = out["perf/model_tflops_per_worker"] / self.peak
        return out

    def console(self, step: int, max_steps: int, v: dict[str, float]) -> None:
        if self.rank != 0:
            return
        mfu = f"  mfu {100 * v['perf/mfu']:.1f}%" if "perf/mfu" in v else ""
        log.info("step %d/%d  loss %.4f (code %.4f pos %.4f)  lr %.2e  gnorm %.3f  %.0f tok/s%s  data %.0f%%  mem %.2fG",
                 step, max_steps, v["loss/total"], v["loss/code"], v["loss/position"], v["lr"],
                 v.get("grad_norm", float("nan")), v["perf/tokens_per_s"], mfu, 100 * v["perf/data_wait_share"],
                 v["memory_gb"])
