"""Stackformer: two stacked causal transformers that predict a masked image's next code and position.

Paper order (code first), for image step t with raster-ordered targets code[t], pos[t]:

    Code-Transformer input  x[t] = emb_code(code[t-1]) + emb_pos(pos[t-1]) + abs[t]
                                   (t = 0: the condition / start token + emb_pos(SOS) + abs[0])
    h[t] = CodeTransformer(x[<=t])               -> code_head(h[t]) predicts code[t]
    g[t] = PositionTransformer(h[<=t] + emb_code(code[<=t]))  -> pos_head(g[t]) predicts pos[t]

``order="pos_first"`` (Stackformer_r) swaps the roles: the first stack predicts the position and
the second, fed ``emb_pos(pos[t])``, predicts the code. A text condition is a prefix of T tokens;
its last token predicts the first image token. Only the first stack sees the prefix; the second
stack runs over the L image steps and reaches the condition through h.

Classifier-free guidance: a class or text model has one more condition id than its vocabulary,
``null_id`` (the class table's last row; for text, every prefix token becomes it). Training
replaces a random share ``train.p_uncond`` of conditions by it (``drop_condition``), and the
sampler runs the conditional and the null batch together to mix their logits.

The same ``first_stream`` / ``second_stream`` calls serve training (whole sequences, no cache)
and KV-cached sampling (one step at a time), so both paths share every line of the math.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mqscale.models.stackformer.args import ModelConfig
from mqscale.models.stackformer.counting import condition_table_size
from mqscale.models.stackformer.layers import Head, KVCache, TransformerStack


@dataclass
class StackformerOutput:
    code_logits: torch.Tensor            # [B, L, K]
    pos_logits: torch.Tensor             # [B, L, G]
    loss: torch.Tensor | None = None     # code_loss + pos_loss_weight * pos_loss
    code_loss: torch.Tensor | None = None
    pos_loss: torch.Tensor | None = None


class Stackformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, G = cfg.n_embd, cfg.n_positions
        self.sos = G  # position id of the start token
        self.code_emb = nn.Embedding(cfg.codebook_size, C)
        self.pos_emb = nn.Embedding(G + 1, C)
        self.cond_emb = nn.Embedding(condition_table_size(cfg), C)
        self.block_size = cfg.resolved_block_size
        # an Embedding, not a bare Parameter: ZeRO-3 gathers and partitions parameters per module
        self.abs_emb = nn.Embedding(self.block_size, C) if cfg.abs_pos else None
        self.drop = nn.Dropout(cfg.dropout)
        self.code_transformer = TransformerStack(cfg.n_code_layer, C, cfg.n_head, cfg.dropout)
        self.pos_transformer = TransformerStack(cfg.n_pos_layer, C, cfg.n_head, cfg.dropout)
        self.code_head = Head(C, cfg.codebook_size)
        self.pos_head = Head(C, G)
        self.code_first = cfg.order == "code_first"
        self.reset_parameters()
        self.set_activation_checkpointing(list(cfg.checkpoint_blocks) or cfg.activation_checkpointing)

    # ------------------------------------------------------------------ structure

    @property
    def first(self) -> TransformerStack:
        return self.code_transformer if self.code_first else self.pos_transformer

    @property
    def second(self) -> TransformerStack:
        return self.pos_transformer if self.code_first else self.code_transformer

    def reset_parameters(self) -> None:
        for m in self.modules():
            self.init_module(m)

    def init_module(self, m: nn.Module) -> None:
        """Initialise one module's own parameters (std ``init_std``; LayerNorms at 1 and 0)."""
        std = self.cfg.init_std
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_activation_checkpointing(self, on: bool | list[int]) -> None:
        """True/False for every block, or a list of block indices (code blocks, then position)."""
        blocks = list(self.code_transformer.blocks) + list(self.pos_transformer.blocks)
        for i, b in enumerate(blocks):
            b.checkpoint = (i in on) if isinstance(on, list) else bool(on)

    # ------------------------------------------------------------------ conditions

    @property
    def null_id(self) -> int:
        """The condition id that means "no condition" (classifier-free guidance)."""
        if self.cfg.cond == "none":
            raise ValueError("an unconditional Stackformer has no null condition")
        return condition_table_size(self.cfg) - 1

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """A condition tensor of ``cond``'s shape holding only the null id."""
        return torch.full_like(cond, self.null_id)

    def drop_condition(self, cond: torch.Tensor, p: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each row's condition by the null one with probability ``p`` (training for CFG)."""
        if p <= 0 or self.cfg.cond == "none":
            return cond
        drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < p
        drop = drop.view(-1, *([1] * (cond.dim() - 1)))
        return torch.where(drop, self.null_condition(cond), cond)

    # ------------------------------------------------------------------ streams

    def prefix(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Condition tokens [B, P, C]: class token, T text tokens, or the learned start token.
        (Embeddings are always called as modules, never indexed, so ZeRO-3 can gather them.)"""
        kind = self.cfg.cond
        device = self.code_emb.weight.device
        if kind == "none":
            e = self.cond_emb(torch.zeros(batch, 1, dtype=torch.long, device=device))
        elif cond is None:
            raise ValueError(f"a {kind}-conditional Stackformer needs cond")
        elif kind == "class":
            e = self.cond_emb(cond.view(batch, 1))
        else:
            if cond.shape != (batch, self.cfg.text_len):
                raise ValueError(f"text cond must be [B, {self.cfg.text_len}], got {tuple(cond.shape)}")
            e = self.cond_emb(cond)
        return e + self.pos_emb(torch.full((1, 1), self.sos, dtype=torch.long, device=device))

    def first_stream(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Input embeddings [B, T, C] at the cache's next sequence indices -> first-stack hidden."""
        if self.abs_emb is not None:
            T = x.shape[1]
            if cache is None:
                if T > self.block_size:
                    raise ValueError(f"sequence of {T} is over block_size {self.block_size}")
                idx = torch.arange(T, device=x.device)
            else:  # (a cache is never longer than block_size: _setup and the decoder check)
                idx = cache.indices(T, x.device)
            x = x + self.abs_emb(idx)
        return self.first(self.drop(x), cache)

    def second_stream(self, h: torch.Tensor, first_ids: torch.Tensor,
                      cache: KVCache | None = None) -> torch.Tensor:
        """First-stack hidden + embedding of what it predicted -> second-stack hidden."""
        emb = self.code_emb if self.code_first else self.pos_emb
        return self.second(h + emb(first_ids), cache)

    def first_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.code_head(h) if self.code_first else self.pos_head(h)

    def second_logits(self, g: torch.Tensor) -> torch.Tensor:
        return self.pos_head(g) if self.code_first else self.code_head(g)

    def token_embedding(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.code_emb(codes) + self.pos_emb(positions)

    # ------------------------------------------------------------------ training call

    def forward(self, codes: torch.Tensor, positions: torch.Tensor, cond: torch.Tensor | None = None,
                compute_loss: bool = True) -> StackformerOutput:
        """Teacher-forced logits for raster-ordered ``codes``/``positions`` [B, L] (also the targets)."""
        B, L = codes.shape
        if positions.shape != codes.shape:
            raise ValueError(f"codes {tuple(codes.shape)} and positions {tuple(positions.shape)} differ")
        pre = self.prefix(cond, B)
        P = pre.shape[1]
        x = torch.cat([pre, self.token_embedding(codes[:, :-1], positions[:, :-1])], dim=1)
        h = self.first_stream(x)[:, P - 1:]                      # [B, L, C], step t predicts token t
        first_ids, second_ids = (codes, positions) if self.code_first else (positions, codes)
        g = self.second_stream(h, first_ids)
        first_logits, second_logits = self.first_logits(h), self.second_logits(g)
        code_logits, pos_logits = ((first_logits, second_logits) if self.code_first
                                   else (second_logits, first_logits))
        out = StackformerOutput(code_logits, pos_logits)
        if compute_loss:
            out.code_loss = F.cross_entropy(code_logits.flatten(0, 1).float(), codes.flatten())
            out.pos_loss = F.cross_entropy(pos_logits.flatten(0, 1).float(), positions.flatten())
            out.loss = out.code_loss + self.cfg.pos_loss_weight * out.pos_loss
        return out

