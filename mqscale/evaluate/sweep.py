"""The paper's mask-ratio trade-off: reconstruction quality against sequence length and sampling speed.

For each mask ratio r the tokenizer keeps L = r * G cells (a tokenizer trained at each ratio, as
the paper does, or one tokenizer whose mask keeps a different number of cells at inference) and
is measured on the same images; a Stackformer of the given architecture with L tokens is timed
sampling images (random weights: the speed of Algorithm 1 does not depend on them). The result
is a table (JSON rows and markdown) and a PNG plot.
"""
from __future__ import annotations

import dataclasses
import io
import time

import torch

from mqscale.core.errors import InputError
from mqscale.models.stackformer.args import ModelConfig
from mqscale.models.stackformer.model import Stackformer
from mqscale.models.stackformer.sampling import SamplingParams, sample

COLUMNS = [("mask_ratio", "mask ratio", "{:.3f}"), ("seq_len", "L", "{:.0f}"), ("psnr", "PSNR (dB)", "{:.2f}"),
           ("ssim", "SSIM", "{:.4f}"), ("lpips", "LPIPS", "{:.4f}"), ("rfid", "rFID", "{:.2f}"),
           ("codebook_usage", "codebook usage", "{:.3f}"), ("sampling_images_per_s", "sampling images/s", "{:.1f}"),
           ("sampling_ms_per_image", "ms/image", "{:.2f}")]


def parse_sweep(text: str) -> list[float]:
    key, _, values = text.partition("=")
    if key.strip() != "mask_ratio" or not values:
        raise InputError(f"--sweep {text!r}: give mask_ratio=R1,R2,... (the one swept setting)")
    try:
        ratios = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sweep {text!r}: ratios must be numbers") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise InputError(f"--sweep {text!r}: ratios must lie in (0, 1]")
    return sorted(ratios)


@torch.no_grad()
def sampling_speed(arch: ModelConfig, seq_len: int, batch: int, device: torch.device, reps: int = 2) -> float:
    """Images/s of KV-cached sampling for ``arch`` with ``seq_len`` tokens (best of ``reps``)."""
    cfg = dataclasses.replace(arch, seq_len=seq_len, block_size=0)
    torch.manual_seed(0)
    model = Stackformer(cfg).to(device).eval()
    cond = {"class": torch.zeros(batch, dtype=torch.long), "none": None,
            "text": torch.zeros(batch, cfg.text_len, dtype=torch.long)}[cfg.cond]
    cond = cond.to(device) if cond is not None else None
    p = SamplingParams(top_k=min(100, cfg.codebook_size))
    sample(model, cond, batch=batch, seq_len=min(seq_len, 4), code=p, pos=p)  # warm-up: first-call costs
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        sample(model, cond, batch=batch, code=p, pos=p, generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return batch / best


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if k in r else "" for k, _, fmt in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_png(rows: list[dict], title: str) -> bytes:
    import matplotlib  # only the sweep draws a plot: imported (and put on the Agg backend) when it does
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (after the backend is chosen)

    L = [r["seq_len"] for r in rows]
    fig, (q, s) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    q.plot(L, [r["psnr"] for r in rows], "o-", color="tab:blue", label="PSNR")
    q.set_xlabel("sequence length L (kept cells)")
    q.set_ylabel("PSNR (dB)", color="tab:blue")
    quality = "rfid" if all("rfid" in r for r in rows) else "ssim"
    q2 = q.twinx()
    q2.plot(L, [r[quality] for r in rows], "s--", color="tab:red")
    q2.set_ylabel("rFID" if quality == "rfid" else "SSIM", color="tab:red")
    for r in rows:
        q.annotate(f"r={r['mask_ratio']:g}", (r["seq_len"], r["psnr"]), textcoords="offset points",
                   xytext=(4, -10), fontsize=8)
    q.set_title("reconstruction quality")
    s.plot(L, [r["sampling_ms_per_image"] for r in rows], "o-", color="tab:green")
    s.set_xlabel("sequence length L")
    s.set_ylabel("sampling ms / image")
    s.set_title("Stackformer sampling cost")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
