"""One pre-tokenization job: an image shard read, encoded by the frozen MQ-VAE, written as one token
shard (atomically), or kept when an earlier run already wrote it. Samples that cannot be used are
skipped and counted by reason. Encoding runs under ``torch.inference_mode``, in bf16 on GPU."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mqscale.core import storage
from mqscale.core.images import from_uint8
from mqscale.core.session import default_device
from mqscale.core.storage import sha256_url
from mqscale.data.images import IMAGE_EXTS, load_rgb, resize_center_crop
from mqscale.data.manifest import ShardInfo
from mqscale.data.tar import ReadStats, iter_samples
from mqscale.data.tokens import TokenMeta, TokenShardWriter
from mqscale.tokenize.jobs import Job, Options, ShardResult, complete_output, expected_header, shard_stats
from mqscale.tokenize.text import encode_batch, load_text_tokenizer
from mqscale.tokenizer.config import TOKENIZER


class ShardTokenizer:
    """Holds the tokenizer; turns one image shard into one token shard (atomically)."""

    def __init__(self, opts: Options, meta: TokenMeta, device: str | None = None, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.opts, self.meta = opts, meta
        self.device = torch.device(device) if device else default_device()
        self.model, cfg = TOKENIZER.load(opts.tokenizer, self.device)
        self.res = cfg.model.resolution
        self.text = load_text_tokenizer(opts.text_tokenizer, opts.storage_options) if meta.cond == "text" else None

    def run(self, job: Job) -> ShardResult:
        storage_options = self.opts.storage_options
        url = storage.join(self.opts.output, job.output_name)
        want = expected_header(job, self.opts)
        done = complete_output(url, want, self.meta, storage_options) if storage.exists(url, storage_options) else None
        if done is not None:
            sha, size = sha256_url(url, storage_options)
            return ShardResult(job.index, ShardInfo(job.output_name, done[0], size, sha), done[1]["stats"], kept=True)
        images, labels, captions, keys, skipped, n_in = self._read(job)
        codes, pos, codes_f, pos_f = self._encode(images)
        text = encode_batch(self.text, captions, self.meta.text_len) if self.text else None
        stats = shard_stats(n_in, skipped, codes, pos, self.meta)
        with storage.atomic_writer(url, storage_options) as f:
            w = TokenShardWriter(f, self.meta, job.index, len(images), self.opts.chunk_size, want | {"stats": stats})
            for i in range(len(images)):
                w.add(codes[i], pos[i], labels[i], None if text is None else text[i], keys[i],
                      None if codes_f is None else codes_f[i], None if pos_f is None else pos_f[i], captions[i])
            w.close()
        sha, size = sha256_url(url, storage_options)
        return ShardResult(job.index, ShardInfo(job.output_name, len(images), size, sha), stats)

    def _read(self, job: Job):
        """Decoded images and what goes with them; a sample whose image, size, label (class
        condition) or caption (always carried over) cannot be used is skipped and counted by reason."""
        stats = ReadStats()
        images, labels, captions, keys = [], [], [], []
        skipped: dict[str, int] = {}
        n_in = 0

        def skip(why: str) -> None:
            skipped[why] = skipped.get(why, 0) + 1

        with storage.open_read(job.input_url, self.opts.storage_options) as f:
            for key, members in iter_samples(f, job.input_url, stats):
                n_in += 1
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                try:
                    if ext is None:
                        raise ValueError("no image member")
                    img = load_rgb(members[ext])
                except (ValueError, OSError, SyntaxError, Image.DecompressionBombError):
                    skip("undecodable")
                    continue
                if img.size != (self.res, self.res):
                    if self.opts.on_size_mismatch == "skip":
                        skip(f"size {img.size[0]}x{img.size[1]} (tokenizer: {self.res})")
                        continue
                    img = resize_center_crop(img, self.res)
                label = -1
                if self.meta.cond == "class" and "cls" in members:
                    try:
                        label = int(members["cls"].decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        skip("bad class label")
                        continue
                if self.meta.cond == "class" and not 0 <= label < self.meta.n_classes:
                    skip("no valid class label")
                    continue
                try:
                    caption = members["txt"].decode("utf-8") if "txt" in members else ""
                except UnicodeDecodeError:
                    skip("undecodable caption")
                    continue
                images.append(np.asarray(img, dtype=np.uint8))
                labels.append(max(label, 0))
                captions.append(caption)
                keys.append(key)
        if stats.corrupt_shards:
            skip("corrupt shard tail")
        if stats.refused_members:
            skip("refused pickle-like members")
        return images, labels, captions, keys, skipped, n_in

    @torch.inference_mode()
    def _encode(self, images: list[np.ndarray]):
        B = self.opts.batch_size
        outs: dict[str, list] = {"c": [], "p": [], "cf": [], "pf": []}
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else torch.autocast("cpu", enabled=False))
        for lo in range(0, len(images), B):
            x = from_uint8(torch.from_numpy(np.stack(images[lo:lo + B])).to(self.device))
            with amp:
                e = self.model.encode(x)
                outs["c"].append(e.codes.cpu().numpy())
                outs["p"].append(e.positions.cpu().numpy())
                if self.meta.flip:
                    ef = self.model.encode(torch.flip(x, dims=[3]))
                    outs["cf"].append(ef.codes.cpu().numpy())
                    outs["pf"].append(ef.positions.cpu().numpy())
        L = self.meta.seq_len
        cat = lambda k: np.concatenate(outs[k]) if outs[k] else np.zeros((0, L), np.int64)  # noqa: E731
        return cat("c"), cat("p"), (cat("cf") if self.meta.flip else None), (cat("pf") if self.meta.flip else None)
