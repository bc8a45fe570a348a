"""Checks a Stackformer run before any worker starts: each failure is one ConfigError line."""
from __future__ import annotations

from mqscale.config import Config, ConfigError
from mqscale.data.loader import Source, resolve_source
from mqscale.data.manifest import ManifestError


def validate_run(cfg: Config, world: int) -> Source:
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
    return src
