"""The jobs of a pre-tokenization run, and whether an output shard already holds a job's result.

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
from dataclasses import asdict, dataclass, field

import numpy as np

from mqscale.core import storage
from mqscale.core.errors import InputError, ManifestError
from mqscale.core.storage import sha256_url
from mqscale.data.loader import Source
from mqscale.data.manifest import TOKENS_FORMAT, ShardInfo, read_manifest
from mqscale.data.tar import ReadStats, iter_samples
from mqscale.data.tokens import HEADER_KEY, TokenMeta, npy_load
from mqscale.tokenize.text import load_text_tokenizer
from mqscale.tokenizer.config import TOKENIZER


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


def tokenizer_identity(path: str) -> tuple[str, dict]:
    """(the tokenizer's weights sha256, its run config as stored) of an exported tokenizer."""
    meta = TOKENIZER.meta(path)
    return meta["weights_sha256"], meta["config"]


def decide_cond(opts: Options, src: Source) -> str:
    if opts.cond != "auto":
        return opts.cond
    if src.classes:
        return "class"
    first = src.shards[0]
    with storage.open_read(first.url, opts.storage_options) as f:
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
        raise InputError(f"--text-tokenizer {e}") from None
    return TokenMeta(grid=grid, codebook_size=m["codebook_size"], seq_len=int(m["mask_ratio"] * grid * grid),
                     cond=cond, n_classes=len(src.classes or []) if cond == "class" else 0,
                     text_len=opts.text_len if cond == "text" else 0,
                     text_vocab_size=text.vocab_size if text else 0, text_tokenizer=text.identity if text else "",
                     tokenizer_sha256=tok_sha, flip=opts.flip)


def plan_jobs(opts: Options, src: Source) -> list[Job]:
    """One job per input shard, with the input's sha256 (from its manifest, or read)."""
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


def expected_header(job: Job, opts: Options) -> dict:
    """What the header of a job's output shard records of its input and options."""
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
            raise InputError(f"{opts.output}: already holds {what} (tokenizer "
                            f"{(old.meta or {}).get('tokenizer_sha256', '?')[:12]}); "
                            "refusing to mix: choose another --output or remove them")
    filesystem, path = storage.get_fs(opts.output, opts.storage_options)
    if not filesystem.exists(path):
        return
    for p in sorted(filesystem.ls(path, detail=False)):
        if p.rsplit("/", 1)[-1].startswith("tokens-") and p.endswith(".tar"):
            head = read_header(storage.join(opts.output, p.rsplit("/", 1)[-1]), opts.storage_options)
            if head is not None and head.get("tokenizer_sha256") != meta.tokenizer_sha256:
                raise InputError(f"{opts.output}: holds {p.rsplit('/', 1)[-1]} from tokenizer "
                                f"{str(head.get('tokenizer_sha256'))[:12]} (this run: {meta.tokenizer_sha256[:12]}); "
                                "refusing to mix: choose another --output or remove them")


def read_header(url: str, storage_options: dict | None) -> dict | None:
    try:
        with storage.open_read(url, storage_options) as f:
            for key, members in iter_samples(f, url, ReadStats()):
                return json.loads(members["json"]) if key == HEADER_KEY else None
    except (OSError, ValueError, KeyError):
        return None
    return None


def complete_output(url: str, want: dict, meta: TokenMeta, storage_options: dict | None) -> tuple[int, dict] | None:
    """(rows, header) if ``url`` is a whole token shard made from the same input by the same run settings."""
    stats, head, rows = ReadStats(), None, 0
    try:
        with storage.open_read(url, storage_options) as f:
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
