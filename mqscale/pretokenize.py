"""Pre-tokenization: image shard i -> token shard i, encoded once by a frozen MQ-VAE.

Why shard-per-task on a pool of Ray actors (not Ray Data): the unit of atomic commit, of rerun
skipping and of determinism is the shard, so the work is scheduled in shards. Each actor loads
the tokenizer once and takes the next shard when it finishes one; a shard's bytes depend only on
the shard and the options (batches restart at every shard), so 1 worker, 8 workers or a rerun
after a kill all write identical files. Ray Data would add a detour through Arrow blocks and
repartitioning for no gain here.

Every output shard's header names its input shard and that shard's sha256, the tokenizer's
checksum and the options; a rerun keeps an existing output shard only if that header matches
and the archive is whole. The header also holds the shard's statistics (``stats``: images read,
skips by reason, code-usage and kept-position counts), so the final summary and the manifest add
up every shard of the output, whether this run wrote it or kept it from an earlier one. They are
exact integers computed from the shard's own input, hence as deterministic as the codes.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mqscale.cli import UserError
from mqscale.data import fs
from mqscale.data.images import IMAGE_EXTS, load_rgb, resize_center_crop
from mqscale.data.loader import Source, resolve_source
from mqscale.data.manifest import (TOKENS_FORMAT, Manifest, ManifestError, ShardInfo, manifest_url,
                                   read_manifest, sha256_url, write_manifest)
from mqscale.data.tario import ReadStats, iter_samples
from mqscale.data.tokens import HEADER_KEY, TokenMeta, TokenShardWriter, npy_load
from mqscale.data.writer import clean_stale_temporaries
from mqscale.text_tokenizer import encode_batch, load_text_tokenizer

log = logging.getLogger("mqscale.tokenize")


@dataclass
class Options:
    tokenizer: str                  # exported tokenizer directory
    input: str
    output: str
    cond: str = "auto"              # auto | none | class | text
    flip: bool = False
    text_tokenizer: str = "bytes"
    text_len: int = 32
    on_size_mismatch: str = "resize"  # resize | skip
    batch_size: int = 32
    chunk_size: int = 256
    storage_options: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What makes two runs' shards interchangeable (not where they read or write).

        ``batch_size`` is in it, always: a shard is encoded in batches of that size (restarting at
        the shard's start), and the same image in another batch composition can get other codes,
        certainly in bf16 on GPU and possibly in fp32 (kernels are chosen per batch shape), so
        shards of two batch sizes are not interchangeable. Resuming a run with another
        ``--batch-size`` therefore rewrites its shards instead of mixing them: keep it to resume."""
        keep = {k: v for k, v in asdict(self).items() if k in ("cond", "flip", "text_tokenizer", "text_len",
                                                                 "on_size_mismatch", "chunk_size",
                                                                 "batch_size")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Job:
    index: int
    input_url: str
    input_name: str
    input_sha256: str
    output_name: str


@dataclass
class ShardResult:
    index: int
    info: ShardInfo
    stats: dict               # shard_stats(): what its header records
    kept: bool = False


# ---------------------------------------------------------------------------------- planning

def tokenizer_identity(path: str) -> tuple[str, dict]:
    from mqscale.convert.export import read_meta
    meta = read_meta(path)
    if meta.get("format") != "mqscale-mqvae/1":
        raise UserError(f"{path}: holds a {meta.get('format')} model, not an MQ-VAE tokenizer")
    return meta["weights_sha256"], meta["config"]


def decide_cond(opts: Options, src: Source) -> str:
    if opts.cond != "auto":
        return opts.cond
    if src.classes:
        return "class"
    first = src.shards[0]
    with fs.open_read(first.url, opts.storage_options) as f:
        sample = next((s for _, s in iter_samples(f, first.url, ReadStats())), {})
    return "class" if "cls" in sample else "text" if "txt" in sample else "none"


def build_meta(opts: Options, src: Source, tok_sha: str, tok_cfg: dict) -> TokenMeta:
    m = tok_cfg["model"]
    factor = 2 ** (len(m["ch_mult"]) - 1)
    grid = m["resolution"] // factor
    cond = decide_cond(opts, src)
    try:
        text = load_text_tokenizer(opts.text_tokenizer, opts.storage_options) if cond == "text" else None
    except ValueError as e:
        raise UserError(f"--text-tokenizer {e}") from None
    return TokenMeta(grid=grid, codebook_size=m["codebook_size"], seq_len=int(m["mask_ratio"] * grid * grid),
                     cond=cond, n_classes=len(src.classes or []) if cond == "class" else 0,
                     text_len=opts.text_len if cond == "text" else 0,
                     text_vocab_size=text.vocab_size if text else 0, text_tokenizer=text.identity if text else "",
                     tokenizer_sha256=tok_sha, flip=opts.flip)


def plan(opts: Options, src: Source) -> list[Job]:
    shas = {}
    if "{" not in opts.input:
        try:
            shas = {s.name: s.sha256 for s in read_manifest(opts.input, opts.storage_options).shards}
        except ManifestError:
            shas = {}
    jobs = []
    for i, s in enumerate(src.shards):
        name = s.url.rsplit("/", 1)[-1]
        sha = shas.get(name) or sha256_url(s.url, opts.storage_options)[0]
        jobs.append(Job(i, s.url, name, sha, f"tokens-{i:06d}.tar"))
    return jobs


def expected_header(job: Job, meta: TokenMeta, opts: Options) -> dict:
    return {"input": job.input_name, "input_sha256": job.input_sha256, "options": opts.fingerprint()}


def refuse_foreign_output(opts: Options, meta: TokenMeta) -> None:
    """An output location holding token shards of another tokenizer (or settings) is never mixed."""
    try:
        old = read_manifest(opts.output, opts.storage_options)
    except ManifestError:
        old = None
    if old is not None:
        theirs = TokenMeta.from_dict(old.meta) if old.format == TOKENS_FORMAT else None
        if theirs is None or theirs.agrees_with(meta):
            what = "image shards" if theirs is None else f"token shards that differ in {theirs.agrees_with(meta)}"
            raise UserError(f"{opts.output}: already holds {what} (tokenizer "
                            f"{(old.meta or {}).get('tokenizer_sha256', '?')[:12]}); "
                            "refusing to mix: choose another --output or remove them")
    filesystem, path = fs.get_fs(opts.output, opts.storage_options)
    if not filesystem.exists(path):
        return
    for p in sorted(filesystem.ls(path, detail=False)):
        if p.rsplit("/", 1)[-1].startswith("tokens-") and p.endswith(".tar"):
            head = read_header(fs.join(opts.output, p.rsplit("/", 1)[-1]), opts.storage_options)
            if head is not None and head.get("tokenizer_sha256") != meta.tokenizer_sha256:
                raise UserError(f"{opts.output}: holds {p.rsplit('/', 1)[-1]} from tokenizer "
                                f"{str(head.get('tokenizer_sha256'))[:12]} (this run: {meta.tokenizer_sha256[:12]}); "
                                "refusing to mix: choose another --output or remove them")


def read_header(url: str, so: dict | None) -> dict | None:
    try:
        with fs.open_read(url, so) as f:
            for key, members in iter_samples(f, url, ReadStats()):
                return json.loads(members["json"]) if key == HEADER_KEY else None
    except (OSError, ValueError, KeyError):
        return None
    return None


def complete_output(url: str, want: dict, meta: TokenMeta, so: dict | None) -> tuple[int, dict] | None:
    """(rows, header) if ``url`` is a whole token shard made from the same input by the same run settings."""
    stats, head, rows = ReadStats(), None, 0
    try:
        with fs.open_read(url, so) as f:
            for key, members in iter_samples(f, url, stats):
                if key == HEADER_KEY:
                    head = json.loads(members["json"])
                elif "codes.npy" in members:
                    rows += int(npy_load(members["codes.npy"]).shape[0])  # header checked before allocating
    except (OSError, ValueError, KeyError):
        return None
    if stats.corrupt_shards or head is None or rows != head.get("n"):
        return None
    if any(head.get(k) != v for k, v in want.items()) or TokenMeta.from_dict(head).agrees_with(meta):
        return None
    if not _stats_fit(head.get("stats"), meta, rows):
        return None        # a shard from before headers held stats (or a damaged one): rewritten
    return rows, head


def shard_stats(n_in: int, skipped: dict[str, int], codes: np.ndarray, positions: np.ndarray,
                meta: TokenMeta) -> dict:
    """A shard's contribution to the summary, as stored in its header: plain ints, sorted keys."""
    return {"images_in": int(n_in), "skipped": {k: int(v) for k, v in sorted(skipped.items())},
            "code_counts": np.bincount(codes.ravel().astype(np.int64), minlength=meta.codebook_size).tolist(),
            "position_counts": np.bincount(positions.ravel().astype(np.int64),
                                           minlength=meta.n_positions).tolist()}


def _stats_fit(stats, meta: TokenMeta, rows: int) -> bool:
    try:
        return (isinstance(stats["images_in"], int) and isinstance(stats["skipped"], dict)
                and all(isinstance(v, int) for v in stats["skipped"].values())
                and len(stats["code_counts"]) == meta.codebook_size
                and len(stats["position_counts"]) == meta.n_positions
                and sum(stats["position_counts"]) == rows * meta.seq_len)
    except (KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------- one shard

class ShardTokenizer:
    """Holds the tokenizer; turns one image shard into one token shard (atomically)."""

    def __init__(self, opts: Options, meta: TokenMeta, device: str | None = None, threads: int = 0):
        from mqscale.convert.export import load_exported
        if threads:
            torch.set_num_threads(threads)
        self.opts, self.meta = opts, meta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, cfg = load_exported(opts.tokenizer, self.device, expect="mqvae")
        self.res = cfg.model.resolution
        self.text = load_text_tokenizer(opts.text_tokenizer, opts.storage_options) if meta.cond == "text" else None

    def run(self, job: Job) -> ShardResult:
        so = self.opts.storage_options
        url = fs.join(self.opts.output, job.output_name)
        want = expected_header(job, self.meta, self.opts)
        done = complete_output(url, want, self.meta, so) if fs.exists(url, so) else None
        if done is not None:
            sha, size = sha256_url(url, so)
            return ShardResult(job.index, ShardInfo(job.output_name, done[0], size, sha), done[1]["stats"], kept=True)
        images, labels, captions, keys, skipped, n_in = self._read(job)
        codes, pos, codes_f, pos_f = self._encode(images)
        text = encode_batch(self.text, captions, self.meta.text_len) if self.text else None
        stats = shard_stats(n_in, skipped, codes, pos, self.meta)
        with fs.atomic_writer(url, so) as f:
            w = TokenShardWriter(f, self.meta, job.index, len(images), self.opts.chunk_size, want | {"stats": stats})
            for i in range(len(images)):
                w.add(codes[i], pos[i], labels[i], None if text is None else text[i], keys[i],
                      None if codes_f is None else codes_f[i], None if pos_f is None else pos_f[i], captions[i])
            w.close()
        sha, size = sha256_url(url, so)
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

        with fs.open_read(job.input_url, self.opts.storage_options) as f:
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
            x = torch.from_numpy(np.stack(images[lo:lo + B])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
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


# ---------------------------------------------------------------------------------- the run

@dataclass
class Summary:
    manifest: str
    shards: int
    written: int
    kept: int
    images_in: int
    sequences_out: int
    skipped: dict[str, int]
    codebook_used: int
    codebook_size: int
    mask_mean: list[float]
    images_per_s: float


def run(opts: Options, workers: int = 1, address: str | None = None, progress: bool = True) -> Summary:
    """``workers`` Ray actors (0: in this process, no Ray). Writes the manifest last."""
    import time

    if address and workers == 0:
        raise UserError(f"--address {address} needs Ray actors, but --workers 0 runs in this process "
                        "without Ray; give --workers N (N >= 1)")

    from mqscale.data.tario import Progress

    tok_sha, tok_cfg = tokenizer_identity(opts.tokenizer)
    try:
        src = resolve_source(opts.input, "images", opts.storage_options)
    except ManifestError as e:
        raise UserError(str(e)) from None
    meta = build_meta(opts, src, tok_sha, tok_cfg)
    refuse_foreign_output(opts, meta)
    fs.makedirs(opts.output, opts.storage_options)
    clean_stale_temporaries(opts.output, opts.storage_options)
    jobs = plan(opts, src)
    bar = Progress(src.total, f"tokenize -> {opts.output}", "img", progress)
    t0 = time.perf_counter()
    results: list[ShardResult] = []
    for r in _execute(opts, meta, jobs, workers, address):
        results.append(r)
        bar.update(src.shards[r.index].n)
    bar.close()
    results.sort(key=lambda r: r.index)
    totals = aggregate(results, meta)
    in_meta = {"input": opts.input, "input_manifest_sha256": _manifest_sha(opts),
               "tokenizer": str(Path(opts.tokenizer)) if "://" not in opts.tokenizer else opts.tokenizer,
               "tokenizer_config": tok_cfg, "options": asdict(opts) | {"storage_options": {}},
               "options_fingerprint": opts.fingerprint(), "images_in": totals["images_in"],
               "skipped": totals["skipped"], "codebook_used": totals["codebook_used"]}
    manifest = Manifest(format=TOKENS_FORMAT, shards=[r.info for r in results], classes=src.classes,
                        meta={**meta.to_dict(), **in_meta}, created_by="mqscale.tokenize")
    url = write_manifest(opts.output, manifest, opts.storage_options)
    fresh = [r for r in results if not r.kept]
    dt = time.perf_counter() - t0
    return Summary(url, len(results), len(fresh), len(results) - len(fresh), **totals,
                   images_per_s=sum(r.stats["images_in"] for r in fresh) / dt if dt > 0 else 0.0)


def aggregate(results: list[ShardResult], meta: TokenMeta) -> dict:
    """The summary's numbers over all shards of the output (each shard's header stats added up)."""
    skipped: dict[str, int] = {}
    codes = np.zeros(meta.codebook_size, np.int64)
    masks = np.zeros(meta.n_positions, np.int64)
    for r in results:
        for k, v in r.stats["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        codes += np.asarray(r.stats["code_counts"], np.int64)
        masks += np.asarray(r.stats["position_counts"], np.int64)
    seqs = sum(r.info.n for r in results)
    return {"images_in": sum(r.stats["images_in"] for r in results), "sequences_out": seqs * (2 if meta.flip else 1),
            "skipped": dict(sorted(skipped.items())), "codebook_used": int((codes > 0).sum()),
            "codebook_size": meta.codebook_size, "mask_mean": (masks / max(1, seqs)).tolist()}


def _manifest_sha(opts: Options) -> str:
    if "{" in opts.input:
        return ""
    try:
        return sha256_url(manifest_url(opts.input), opts.storage_options)[0]
    except OSError:
        return ""


def _execute(opts: Options, meta: TokenMeta, jobs: list[Job], workers: int, address: str | None):
    if workers == 0:
        worker = ShardTokenizer(opts, meta)
        for job in jobs:
            yield worker.run(job)
        return
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False if not address else None)
    n, cpus, gpus = actor_sizes([node["Resources"] for node in ray.nodes() if node.get("Alive")], workers)
    if n < workers:
        log.warning("--workers %d: the Ray cluster can place only %d tokenizer actors (%d CPU%s each); "
                    "using %d", workers, n, cpus, f", {gpus} GPU" if gpus else "", n)
    actor = ray.remote(num_gpus=gpus, num_cpus=cpus)(ShardTokenizer)
    pool = ActorPool([actor.remote(opts, meta, None, cpus) for _ in range(n)])
    yield from pool.map_unordered(lambda a, j: a.run.remote(j), jobs)


def actor_sizes(nodes: list[dict], workers: int) -> tuple[int, int, int]:
    """(actors, CPUs each, GPUs each) for ``workers`` tokenizer actors on nodes with these Ray
    resources (``{"CPU": 16, "GPU": 2, ...}`` each), such that every actor can be placed at once.

    Why: the pool hands a shard to every actor up front, so one actor Ray can never place (asking
    more CPUs than any node has, or a GPU beyond the cluster's) hangs the run instead of failing.
    With GPUs there is one actor per GPU (and a CPU beside it); otherwise the cluster's CPUs are
    shared out, no actor asking more than its node holds, and actors that do not fit are dropped.
    """
    gpu_nodes = [(int(r.get("GPU", 0)), int(r.get("CPU", 0))) for r in nodes if int(r.get("GPU", 0)) >= 1]
    if gpu_nodes:
        slots = sum(min(g, c) for g, c in gpu_nodes)
        if not slots:
            raise UserError("the Ray cluster's GPU nodes have no CPU to run a tokenizer actor beside a GPU")
        return min(workers, slots), 1, 1
    cpus = [int(r.get("CPU", 0)) for r in nodes]
    if not any(cpus):
        raise UserError("the Ray cluster has no CPU to run a tokenizer actor on")
    each = max(1, min(sum(cpus) // workers, max(cpus)))
    while each > 1 and sum(c // each for c in cpus) < workers:
        each -= 1
    return min(workers, sum(c // each for c in cpus)), each, 0
