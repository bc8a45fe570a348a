"""A from-scratch stand-in for the official code-first Stackformer, for conversion tests.

It reproduces the official ``ReverseStackedPositionGPT``'s parameter names and computation
(separate key/query/value projections, an explicit masked softmax, one shared table for class
and code ids, SOS position = grid_size, heads over n_classes + K codes and G + 1 positions), so a
state dict it produces looks like one from an official checkpoint. Written for these tests; no
official code is included.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class _Attn(nn.Module):
    def __init__(self, c: int, n_head: int, block: int):
        super().__init__()
        self.key, self.query, self.value, self.proj = (nn.Linear(c, c) for _ in range(4))
        self.n_head = n_head
        self.register_buffer("mask", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf")).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, c: int, n_head: int, block: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = _Attn(c, n_head, block)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c), nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class OfficialCodeFirst(nn.Module):
    def __init__(self, vocab_size: int, position_size: int, block_size: int, value_layer: int,
                 position_layer: int, n_head: int, n_embd: int, code_first: bool = True):
        super().__init__()
        self.code_first = code_first
        self.value_pos_emb = nn.Embedding(position_size, n_embd)
        self.value_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Parameter(torch.randn(1, block_size, n_embd) * 0.02)
        self.position_transformer = nn.Sequential(*[_Block(n_embd, n_head, block_size)
                                                    for _ in range(position_layer)])
        self.value_transformer = nn.Sequential(*[_Block(n_embd, n_head, block_size)
                                                 for _ in range(value_layer)])
        self.position_head = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, position_size, bias=False))
        self.value_head = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab_size, bias=False))
        for m in self.modules():  # non-trivial LayerNorms so the test sees them carried over
            if isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight, 1.0, 0.1)
                nn.init.normal_(m.bias, 0.0, 0.1)

    def forward(self, idx, pos_idx):
        """idx = [class, codes + n_classes], pos_idx = [sos, positions]; returns both logits."""
        x = self.value_emb(idx[:, :-1]) + self.value_pos_emb(pos_idx[:, :-1])
        x = x + self.pos_emb[:, : x.shape[1]]
        if self.code_first:
            value_hidden = self.value_transformer(x)
            position_hidden = self.position_transformer(value_hidden + self.value_emb(idx[:, 1:]))
        else:
            position_hidden = self.position_transformer(x)
            value_hidden = self.value_transformer(position_hidden + self.value_pos_emb(pos_idx[:, 1:]))
        return {"value_logits": self.value_head(value_hidden),
                "position_logits": self.position_head(position_hidden)}
