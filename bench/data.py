"""Data-path throughput and size: our token/image shards vs a plain per-sample webdataset pipeline.

Prints one JSON object with, for L = 256 sequences on a 32x32 grid (K = 1024):
- bytes per sequence, against the raw payload of 2 bytes per code + 2 per position;
- token loader sequences/s on one core (torch threads = 1, no workers), local disk and loopback S3;
- image shard read throughput (images/s, decode + crop to 256 px, one core);
- best of two passes each;
- the same figures for a plain per-sample webdataset pipeline (``.npy`` members per sequence,
  ``decode("rgb8")`` for images), side by side.

The S3 server (moto) runs in a separate process so it does not share the reader's core.

    python bench/data.py [--sequences 40000] [--images 1500]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from mqscale.core import storage  # noqa: E402
from mqscale.data.config import DataConfig  # noqa: E402
from mqscale.data.loader import StreamingLoader  # noqa: E402
from mqscale.data.manifest import TOKENS_FORMAT  # noqa: E402
from mqscale.data.tokens import TokenMeta, TokenShardWriter  # noqa: E402
from mqscale.data.writer import ShardJob, shard_name, write_shard_set  # noqa: E402

META = TokenMeta(grid=32, codebook_size=1024, seq_len=256, cond="class", n_classes=1000)


def sequences(n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    pos = np.sort(np.argsort(g.random((n, META.n_positions)), axis=1)[:, :META.seq_len], axis=1)
    return g.integers(0, META.codebook_size, (n, META.seq_len)), pos, g.integers(0, META.n_classes, n)


def produce(f, job: ShardJob) -> int:
    codes, pos, labels = job.items
    w = TokenShardWriter(f, META, job.index, len(codes), chunk_size=256)
    for c, p, lbl in zip(codes, pos, labels):
        w.add(c, p, int(lbl))
    return w.close()


def write_ours(base: str, data, shards: int, so=None) -> None:
    codes, pos, labels = data
    jobs = []
    for i, idx in enumerate(np.array_split(np.arange(len(codes)), shards)):
        keys = ["header"] + [f"{c:06d}" for c in range((len(idx) + 255) // 256)]
        jobs.append(ShardJob(i, shard_name("tokens", i), keys, (codes[idx], pos[idx], labels[idx]), n=len(idx)))
    write_shard_set(base, jobs, produce, fmt=TOKENS_FORMAT, meta=META.to_dict(), storage_options=so,
                    progress=False)


def write_plain(base: str, data, shards: int, so=None) -> list[str]:
    import webdataset as wds
    codes, pos, labels = data
    urls = []
    for i, idx in enumerate(np.array_split(np.arange(len(codes)), shards)):
        url = storage.join(base, f"plain-{i:06d}.tar")
        with storage.atomic_writer(url, so) as f:
            w = wds.TarWriter(f)
            for j in idx:
                w.write({"__key__": f"{j:09d}", "codes.npy": codes[j].astype(np.int16),
                         "positions.npy": pos[j].astype(np.int16), "cls": int(labels[j])})
            w.close()
        urls.append(url)
    return urls


def total_bytes(base: str, prefix: str, so=None) -> int:
    filesystem, path = storage.get_fs(base, so)
    return sum(filesystem.size(p) for p in filesystem.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith(prefix))


def best_of(fn, *args, runs: int = 2) -> float:
    """Items/s, best of ``runs`` passes (the first pays one-time imports and cold caches)."""
    return max(fn(*args) for _ in range(runs))


def time_loader(url: str, cfg: DataConfig) -> float:
    n, t = 0, time.perf_counter()
    for b in StreamingLoader(url, cfg, pin_memory=False):
        n += int(b["mask"].sum())
    return n / (time.perf_counter() - t)


def time_plain_tokens(urls: list[str], batch: int) -> float:
    import webdataset as wds
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(4096, seed=0)
          .decode().to_tuple("codes.npy", "positions.npy", "cls").batched(batch))
    n, t = 0, time.perf_counter()
    for codes, pos, cls in ds:
        torch.as_tensor(np.asarray(codes), dtype=torch.long)
        torch.as_tensor(np.asarray(pos), dtype=torch.long)
        n += len(cls)
    return n / (time.perf_counter() - t)


def time_plain_images(urls: list[str], batch: int, res: int) -> float:
    import webdataset as wds
    from PIL import Image

    from mqscale.data.images import resize_center_crop
    crop = lambda a: np.asarray(resize_center_crop(Image.fromarray(a), res))  # noqa: E731
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
          .to_tuple("png;jpg", "cls").map_tuple(crop, int).batched(batch))
    n, t = 0, time.perf_counter()
    for imgs, _ in ds:
        torch.from_numpy(np.asarray(imgs))
        n += len(imgs)
    return n / (time.perf_counter() - t)


def start_s3() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
    import s3fs
    for _ in range(100):
        try:
            s3fs.S3FileSystem(**opts, skip_instance_cache=True).mkdir("bench")
            return proc, opts
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=40000)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    ns = p.parse_args()
    torch.set_num_threads(1)
    storage.register_webdataset_opener()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    tmp = tempfile.mkdtemp(prefix="mqscale-bench-")
    data = sequences(ns.sequences)
    shards = max(2, ns.sequences // 10000)
    write_ours(tmp + "/ours", data, shards)
    plain_urls = write_plain(tmp + "/plain", data, shards)
    raw = 4 * META.seq_len
    ours_b = total_bytes(tmp + "/ours", "tokens-") / ns.sequences
    plain_b = total_bytes(tmp + "/plain", "plain-") / ns.sequences
    cfg = DataConfig(batch_size=ns.batch, num_workers=0, shuffle_buffer=4096)
    res = {"tokens": {"L": META.seq_len, "sequences": ns.sequences, "raw_payload_bytes": raw,
                      "ours_bytes_per_seq": round(ours_b, 1), "ours_vs_raw": round(ours_b / raw, 3),
                      "plain_wds_bytes_per_seq": round(plain_b, 1), "plain_vs_raw": round(plain_b / raw, 3)}}
    res["tokens"]["ours_seq_per_s_local"] = round(best_of(time_loader, tmp + "/ours", cfg))
    res["tokens"]["plain_wds_seq_per_s_local"] = round(best_of(time_plain_tokens, plain_urls, ns.batch))
    proc, so = start_s3()
    try:
        write_ours("s3://bench/ours", data, shards, so)
        s3_plain = write_plain("s3://bench/plain", data, shards, so)
        s3cfg = DataConfig(**{**cfg.__dict__, "storage_options": so})
        res["tokens"]["ours_seq_per_s_s3"] = round(best_of(time_loader, "s3://bench/ours", s3cfg))
        storage.register_webdataset_opener(so)   # plain webdataset opens s3:// through fsspec
        res["tokens"]["plain_wds_seq_per_s_s3"] = round(best_of(time_plain_tokens, s3_plain, ns.batch))
    finally:
        proc.kill()
    from data_tools.make_shapes import write_shapes
    write_shapes(tmp + "/img", ns.images, resolution=256, shard_size=500, fmt="jpg", progress=False)
    icfg = DataConfig(batch_size=32, num_workers=0, shuffle_buffer=256, resolution=256)
    img_urls = sorted(str(p) for p in Path(tmp, "img").glob("shapes-*.tar"))
    res["images"] = {"images": ns.images, "resolution": 256, "format": "jpg",
                     "ours_images_per_s": round(best_of(time_loader, tmp + "/img", icfg), 1),
                     "plain_wds_images_per_s": round(best_of(time_plain_images, img_urls, 32, 256), 1)}
    print(json.dumps({"bench": "data", "env": environment(), **res}, indent=2))


if __name__ == "__main__":
    main()
