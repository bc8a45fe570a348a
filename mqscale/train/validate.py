"""Checks a Stackformer run before any worker starts: each failure is one ConfigError line.

Nothing here changes the config: what follows from it (the micro-batch and accumulation that
keep the global batch on each world size) is computed where it is used (``elastic.plan_batch``).
An elastic run (``ray.num_workers: [min, max]``) is checked for every world it may get.
"""
from __future__ import annotations

import logging
import posixpath
from typing import Iterable

import torch

from mqscale.core import storage
from mqscale.core.checkpoint import CheckpointStore, resume_candidate
from mqscale.core.config import from_dict
from mqscale.core.errors import ArtifactError, CheckpointError, ConfigError, InputError, ManifestError
from mqscale.data.loader import Source, resolve_source
from mqscale.data.manifest import read_manifest
from mqscale.judge.metrics import load_judge
from mqscale.tokenizer.config import TOKENIZER
from mqscale.train.config import Config
from mqscale.train.elastic import conversion_state, not_movable, plan_batch, read_resize
from mqscale.train.engine import ds_config

log = logging.getLogger("mqscale.train")


def validate_run(cfg: Config, worlds: int | Iterable[int], run_url: str | None = None) -> Source:
    """``worlds``: the number of workers, or every number an elastic run may get."""
    worlds = [worlds] if isinstance(worlds, int) else list(worlds)
    t, d, m = cfg.train, cfg.data, cfg.model
    for world in worlds:          # a fresh run's batch on each world (a resumed one: check_resume)
        plan = plan_batch(cfg, world)
        ds_config(cfg, world, plan)            # an expert DeepSpeed JSON that conflicts fails here
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: fp16 needs GPUs; use bf16 on CPU")
    if not d.train_url:
        raise ConfigError("data.train_url: empty; point it at token shards (python -m mqscale.tokenize)")
    try:
        src = resolve_source(d.train_url, "tokens", d.storage_options)
    except (ManifestError, OSError, ValueError) as e:
        raise ConfigError(f"data.train_url: {e}") from None
    try:
        missing = missing_shards(src, d.storage_options)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.train_url: cannot list the shards ({e})") from None
    if missing:
        raise ConfigError(f"data.train_url: {len(missing)} of {len(src.shards)} shards the manifest lists are "
                          f"missing, e.g. {missing[0]}")
    meta = src.meta
    for key, theirs, ours in (("grid", meta.grid, m.grid), ("codebook_size", meta.codebook_size, m.codebook_size),
                              ("cond", meta.cond, m.cond)):
        if theirs != ours:
            raise ConfigError(f"model.{key}: {ours} does not match the token shards' {key} {theirs} "
                              f"({d.train_url})")
    if meta.seq_len > m.seq_len:
        raise ConfigError(f"model.seq_len: {m.seq_len} is shorter than the token shards' L = {meta.seq_len}")
    if meta.cond == "class" and meta.n_classes > m.n_classes:
        raise ConfigError(f"model.n_classes: {m.n_classes} is fewer than the token shards' {meta.n_classes} classes")
    if meta.cond == "text" and (meta.text_len != m.text_len or meta.text_vocab_size > m.text_vocab_size):
        raise ConfigError(f"model.text_len/text_vocab_size: {m.text_len}/{m.text_vocab_size} do not fit the token "
                          f"shards' {meta.text_len}/{meta.text_vocab_size}")
    if cfg.logging.tokenizer:
        try:
            tok = TOKENIZER.meta(cfg.logging.tokenizer)
        except ArtifactError as e:
            raise ConfigError(f"logging.tokenizer: {e}") from None
        if meta.tokenizer_sha256 and tok.get("weights_sha256") != meta.tokenizer_sha256:
            raise ConfigError(f"logging.tokenizer: {cfg.logging.tokenizer} is not the tokenizer that made the "
                              f"token shards (sha256 {str(tok.get('weights_sha256'))[:12]} vs "
                              f"{meta.tokenizer_sha256[:12]})")
        check_tokenizer_fits(cfg, tok)
    if cfg.logging.judge:
        check_judge(cfg, resolution=tok["config"]["model"]["resolution"] if cfg.logging.tokenizer else None)
    check_resume(cfg, run_url, worlds)
    return src


def check_judge(cfg: Config, resolution: int | None) -> None:
    """The quality judge must judge what this run samples: decoded images of the tokenizer's
    resolution, of the dataset the token shards were made from, in the model's classes."""
    where = f"logging.judge: {cfg.logging.judge}"
    if resolution is None:
        raise ConfigError(f"{where}: needs logging.tokenizer (the samples it judges are decoded by it)")
    if cfg.model.cond != "class":
        raise ConfigError(f"{where}: conditional accuracy needs a class-conditional model (model.cond is "
                          f"{cfg.model.cond})")
    try:
        source = read_manifest(cfg.data.train_url, cfg.data.storage_options).meta.get("input_manifest_sha256", "")
    except (ManifestError, OSError, ValueError):
        source = ""   # a brace pattern: no manifest records where the images came from
    try:
        judge = load_judge(cfg.logging.judge, resolution=resolution, dataset_sha256=source or None,
                           min_accuracy=cfg.logging.judge_min_accuracy)
    except (ArtifactError, InputError) as e:
        raise ConfigError(f"logging.judge: {e}") from None
    if len(judge.record.classes) != cfg.model.n_classes:
        raise ConfigError(f"{where}: judges {len(judge.record.classes)} classes, the model has "
                          f"model.n_classes={cfg.model.n_classes}")


def check_resume(cfg: Config, run_url: str | None, worlds: list[int]) -> None:
    """The checkpoint a launch would resume (markers and ``resize.json`` only) continues on each
    of ``worlds``: the same world always; another only from a checkpoint that records its data
    positions, with a batch plan that keeps its global batch, and not from NVMe offload."""
    ckpt, what = resume_candidate(cfg.checkpoint, run_url)
    if ckpt is None:
        return
    try:
        saved = read_resize(ckpt, cfg.checkpoint.storage_options)
    except CheckpointError as e:
        raise ConfigError(f"{what}: {e}") from None
    moving = [w for w in worlds if w != ckpt.world]
    if moving and saved is None:
        raise ConfigError(f"{what}: {not_movable(ckpt, moving[0])}")
    if moving and "nvme" in (cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_param):
        raise ConfigError(f"{what}: {ckpt.url} was saved by {ckpt.world} workers; NVMe-offloaded optimizer "
                          f"states cannot continue on {moving[0]}: relaunch with {ckpt.world} workers")
    for world in worlds:
        plan_batch(cfg, world, saved, f"{what}: {ckpt.url}")
    if moving and cfg.deepspeed.zero_stage > 0 and run_url:
        why = conversion_state(CheckpointStore(run_url, cfg.checkpoint.storage_options), ckpt)
        if why:
            log.warning("universal conversion %s: ignored, it is made again", why)


def missing_shards(src: Source, storage_options: dict) -> list[str]:
    """The shard URLs of ``src`` that are not on the storage: one listing per directory, not a
    request per shard (a manifest may list thousands)."""
    by_dir: dict[str, list[str]] = {}
    for s in src.shards:
        parent, name = s.url.rsplit("/", 1) if "/" in s.url else (".", s.url)
        by_dir.setdefault(parent, []).append(name)
    missing = []
    for parent, names in by_dir.items():
        filesystem, path = storage.get_fs(parent, storage_options)
        try:
            present = {posixpath.basename(p.rstrip("/")) for p in filesystem.ls(path, detail=False)}
        except Exception:  # no listing here (http, or a bucket policy without ListBucket)
            present = set()
        absent = [n for n in names if n not in present]
        if len(absent) == len(names):  # listed nothing we want: ask for each shard instead
            absent = [n for n in names if not storage.exists(f"{parent}/{n}", storage_options)]
        missing += [f"{parent}/{n}" for n in absent]
    return missing


def check_tokenizer_fits(cfg: Config, tok: dict) -> None:
    """The sample-grid tokenizer must decode this model's tokens: an MQ-VAE of the same grid and codebook."""
    where = f"logging.tokenizer: {cfg.logging.tokenizer}"
    try:
        t = from_dict(tok["config"], f"{cfg.logging.tokenizer}/config.json", TOKENIZER.config).model
    except (KeyError, ConfigError) as e:
        raise ConfigError(f"{where}: its config does not load ({e})") from None
    m = cfg.model
    for key, theirs, ours in (("grid", t.grid, m.grid), ("codebook_size", t.codebook_size, m.codebook_size)):
        if theirs != ours:
            raise ConfigError(f"model.{key}: {ours} does not match the tokenizer's {key} {theirs} ({where})")
