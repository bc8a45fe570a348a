"""Checks a Stackformer run before any worker starts: each failure is one ConfigError line."""
from __future__ import annotations

import posixpath

from mqscale.config import Config, ConfigError
from mqscale.data import fs
from mqscale.data.loader import Source, resolve_source
from mqscale.data.manifest import ManifestError


def validate_run(cfg: Config, world: int, run_url: str | None = None) -> Source:
    t, d, m = cfg.train, cfg.data, cfg.model
    per_micro = d.batch_size * world
    if t.global_batch:
        if t.global_batch % per_micro:
            raise ConfigError(f"train.global_batch: {t.global_batch} is not divisible by data.batch_size x world "
                              f"= {d.batch_size} x {world} = {per_micro}")
        accum = t.global_batch // per_micro
        if t.grad_accum not in (1, accum):
            raise ConfigError(f"train.grad_accum: {t.grad_accum} contradicts train.global_batch={t.global_batch} "
                              f"(which implies {accum})")
        t.grad_accum = accum
    if t.precision == "fp16":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("train.precision: fp16 needs GPUs; use bf16 on CPU")
    from mqscale.train.engine import ds_config
    ds_config(cfg, world)                      # an expert DeepSpeed JSON that conflicts fails here
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
        from mqscale.convert.export import read_meta
        try:
            tok = read_meta(cfg.logging.tokenizer)
        except Exception as e:  # UserError with the reason
            raise ConfigError(f"logging.tokenizer: {e}") from None
        if meta.tokenizer_sha256 and tok.get("weights_sha256") != meta.tokenizer_sha256:
            raise ConfigError(f"logging.tokenizer: {cfg.logging.tokenizer} is not the tokenizer that made the "
                              f"token shards (sha256 {str(tok.get('weights_sha256'))[:12]} vs "
                              f"{meta.tokenizer_sha256[:12]})")
        check_tokenizer_fits(cfg, tok)
    own = check_own_checkpoints(cfg, world, run_url) if run_url and cfg.checkpoint.resume == "auto" else False
    if cfg.checkpoint.resume_from and not own:  # a run with checkpoints of its own never reads its seed again
        check_resume_from(cfg, world)
    return src


def missing_shards(src: Source, storage_options: dict) -> list[str]:
    """The shard URLs of ``src`` that are not on the storage: one listing per directory, not a
    request per shard (a manifest may list thousands)."""
    by_dir: dict[str, list[str]] = {}
    for s in src.shards:
        parent, name = s.url.rsplit("/", 1) if "/" in s.url else (".", s.url)
        by_dir.setdefault(parent, []).append(name)
    missing = []
    for parent, names in by_dir.items():
        fs_, path = fs.get_fs(parent, storage_options)
        try:
            present = {posixpath.basename(p.rstrip("/")) for p in fs_.ls(path, detail=False)}
        except Exception:  # no listing here (http, or a bucket policy without ListBucket)
            present = set()
        absent = [n for n in names if n not in present]
        if len(absent) == len(names):  # listed nothing we want: ask for each shard instead
            absent = [n for n in names if not fs.exists(f"{parent}/{n}", storage_options)]
        missing += [f"{parent}/{n}" for n in absent]
    return missing


def check_tokenizer_fits(cfg: Config, tok: dict) -> None:
    """The sample-grid tokenizer must decode this model's tokens: an MQ-VAE of the same grid and codebook."""
    from mqscale.config import from_dict
    from mqscale.tokenizer_config import TokenizerRunConfig
    where = f"logging.tokenizer: {cfg.logging.tokenizer}"
    if tok.get("format") != "mqscale-mqvae/1":
        raise ConfigError(f"{where} holds a {tok.get('format')!r} model, not an MQ-VAE tokenizer")
    try:
        t = from_dict(tok["config"], f"{cfg.logging.tokenizer}/config.json", root=TokenizerRunConfig).model
    except (KeyError, ConfigError) as e:
        raise ConfigError(f"{where}: its config does not load ({e})") from None
    m = cfg.model
    for key, theirs, ours in (("grid", t.grid, m.grid), ("codebook_size", t.codebook_size, m.codebook_size)):
        if theirs != ours:
            raise ConfigError(f"model.{key}: {ours} does not match the tokenizer's {key} {theirs} ({where})")


RESHARD = ("resharding a ZeRO checkpoint onto another number of workers is not supported (each rank's "
           "optimizer partition and data position belong to that world size)")


def check_own_checkpoints(cfg: Config, world: int, run_url: str) -> bool:
    """A relaunch resumes the run's newest checkpoint: refuse it here, not in every worker, when it
    was saved by another number of workers (markers only; the workers verify the files). True when
    the run has checkpoints of its own."""
    from mqscale.train.checkpoint import CheckpointStore
    try:
        found = CheckpointStore(run_url, cfg.checkpoint.storage_options).candidates()
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint.dir: cannot list the run's checkpoints at {run_url} ({e})") from None
    if found and found[0].marker.get("world") != world:
        saved = found[0].marker.get("world")
        raise ConfigError(f"checkpoint: {found[0].url} was saved by {saved} workers, this run has {world}: {RESHARD}; "
                          f"relaunch with {saved} workers, or start a new run (another name)")
    return bool(found)


def check_resume_from(cfg: Config, world: int) -> None:
    """A named checkpoint must at least be one (its marker readable) and be from as many workers;
    the workers verify every file's sha256 before they load it."""
    from mqscale.train.checkpoint import MARKER, CheckpointError, read_marker
    url = cfg.checkpoint.resume_from
    try:
        fs_, root = fs.get_fs(url, cfg.checkpoint.storage_options)
        marker = read_marker(fs_, posixpath.join(root, MARKER))
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"checkpoint.resume_from: {url}: {e}; not a complete mqscale checkpoint") from None
    if marker.get("world") != world:
        raise ConfigError(f"checkpoint.resume_from: {url} was saved by {marker.get('world')} workers, this run "
                          f"has {world}: {RESHARD}")
