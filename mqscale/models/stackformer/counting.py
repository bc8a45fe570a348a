"""Parameter and FLOP counts from a config alone (no model built), for planning and MFU.

FLOPs follow the PaLM / torchtitan convention: a matmul with N weights costs 2N per token
forward and 4N backward; attention adds 2 * 2 * T * C per token per layer forward (QK^T and AV,
counted over the full context T, not halved for causality). Embedding lookups are free.
"""
from __future__ import annotations

from mqscale.models.stackformer.args import ModelConfig


def block_params(c: int) -> int:
    # fused qkv (3C^2 + 3C), proj (C^2 + C), mlp (4C^2 + 4C + 4C^2 + C), two LayerNorms (4C)
    return 12 * c * c + 13 * c


def condition_table_size(cfg: ModelConfig) -> int:
    """Rows of the condition table: the vocabulary, plus the null id (classifier-free guidance)
    for class and text conditioning."""
    return {"class": cfg.n_classes + 1, "text": cfg.text_vocab_size + 1, "none": 1}[cfg.cond]


def param_count(cfg: ModelConfig) -> int:
    c, k, g = cfg.n_embd, cfg.codebook_size, cfg.n_positions
    embeddings = (k + g + 1 + condition_table_size(cfg)) * c + (cfg.resolved_block_size * c if cfg.abs_pos else 0)
    heads = (2 * c + k * c) + (2 * c + g * c)
    return (cfg.n_code_layer + cfg.n_pos_layer) * block_params(c) + embeddings + heads


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int | None = None) -> int:
    c, k, g = cfg.n_embd, cfg.codebook_size, cfg.n_positions
    L = seq_len or cfg.seq_len
    t_first = cfg.prefix_len + L - 1   # the first stack also reads the condition prefix
    n_first, n_second = ((cfg.n_code_layer, cfg.n_pos_layer) if cfg.order == "code_first"
                         else (cfg.n_pos_layer, cfg.n_code_layer))
    per_layer = lambda t: t * (2 * 12 * c * c + 4 * t * c)  # noqa: E731  (matmuls + attention)
    return n_first * per_layer(t_first) + n_second * per_layer(L) + L * 2 * c * (k + g)


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per image token (the unit tokens/s is counted in)."""
    L = seq_len or cfg.seq_len
    return 3 * forward_flops_per_sequence(cfg, L) / L
