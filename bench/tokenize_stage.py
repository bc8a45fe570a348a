"""Pre-tokenization throughput, output size, and what it saves a Stackformer training step.

Prints one JSON object:
- images/s of ``mqscale.tokenize`` on this CPU with the debug tokenizer (64 px, 16x16 grid,
  L = 64) for 1 and 2 Ray workers (wall time of the whole run, Ray start included separately);
- output bytes per image;
- the per-batch cost a Stackformer step pays either way: reading a batch of pre-tokenized
  sequences through the loader vs encoding that batch's images with the same tokenizer (what the
  official pipeline does at every step). Target: reading < 2% of encoding.

    python bench/tokenize_stage.py [--images 4000] [--batch 32]

(Not bench/tokenize.py: a script of that name in bench/ shadows the standard library's tokenize.)
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_seconds  # noqa: E402

from data_tools.make_shapes import write_shapes  # noqa: E402
from mqscale.data.config import DataConfig  # noqa: E402
from mqscale.data.loader import StreamingLoader  # noqa: E402
from mqscale.data.manifest import read_manifest  # noqa: E402
from mqscale.models.mqvae.model import MQVAE  # noqa: E402
from mqscale.tokenizer.config import (
    TOKENIZER,  # noqa: E402
    load_tokenizer_config,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]


def tokenize(tok: str, inp: str, out: str, workers: int) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mqscale.tokenize", "--tokenizer", tok, "--input", inp, "--output", out,
                        "--workers", str(workers), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    rate = float(re.search(r"([\d.]+) images/s", r.stdout).group(1))
    return {"workers": workers, "wall_s_including_start": round(wall, 2), "images_per_s_in_run": round(rate, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    ns = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mqscale-bench-tok-"))
    cfg = load_tokenizer_config("configs/mqvae/debug.yaml")
    torch.manual_seed(0)
    TOKENIZER.save(MQVAE(cfg.model).eval(), cfg, tmp / "tok")
    write_shapes(str(tmp / "img"), ns.images, resolution=cfg.model.resolution, shard_size=ns.images // 4,
                 progress=False)
    runs = [tokenize(str(tmp / "tok"), str(tmp / "img"), str(tmp / f"out{w}"), w) for w in (0, 1, 2)]
    m = read_manifest(str(tmp / "out1"))
    bytes_per_image = sum(s.bytes for s in m.shards) / m.total
    # the per-step comparison, on one core each way
    torch.set_num_threads(1)
    model, _ = TOKENIZER.load(str(tmp / "tok"))
    x = torch.rand(ns.batch, 3, cfg.model.resolution, cfg.model.resolution) * 2 - 1
    encode_s, _ = median_seconds(lambda: model.encode(x), 5)
    loader = StreamingLoader(str(tmp / "out1"), DataConfig(batch_size=ns.batch, num_workers=0), pin_memory=False)
    n, t = 0, time.perf_counter()
    for _ in range(3):
        for b in loader:
            n += 1
    read_s = (time.perf_counter() - t) / n
    print(json.dumps({
        "bench": "tokenize", "env": environment(), "tokenizer": "configs/mqvae/debug.yaml (random init)",
        "resolution": cfg.model.resolution, "grid": cfg.model.grid, "L": cfg.model.keep, "images": ns.images,
        "runs": runs, "note": "workers 0 = in-process, no Ray",
        "bytes_per_image": round(bytes_per_image, 1),
        "per_batch": {"batch": ns.batch, "encode_images_s": round(encode_s, 5), "read_tokens_s": round(read_s, 6),
                      "read_over_encode": round(read_s / encode_s, 5)},
        "target": "read_over_encode < 0.02",
    }, indent=2))


if __name__ == "__main__":
    main()
