"""Transformer parts shared by both Stackformer streams: causal attention, block, stack, KV caches.

Why: attention goes through ``scaled_dot_product_attention`` with ``is_causal`` so flash and
memory-efficient kernels apply on GPU and no T x T mask buffer is ever stored; QKV is one fused
matmul; the KV cache is preallocated so a decoding step is one new token per layer, no concat.
``StaticKVCache`` is the compiled decoder's (``decode.py``): its fill level is a tensor and every
step attends over the whole buffer under a mask, so each step has the same shapes and the same
graph. Pure torch: nothing here knows about distribution.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class KVCache:
    """Preallocated keys and values of one transformer stack, filled left to right."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        # uninitialised: a position is always written before any attention reads it
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # tokens already cached (same for every layer between stack calls)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def indices(self, n: int, device) -> torch.Tensor:
        """Sequence indices of the next ``n`` tokens."""
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; step needs {end}")
        return torch.arange(self.length, end, device=device)

    def advance(self, n: int) -> None:
        self.length += n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys and values; (keys, values, start) of everything cached."""
        start = self.length
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; step needs {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], start


class StaticKVCache(KVCache):
    """A KV cache whose shapes never change: the fill level is a 0-d tensor, each step writes at
    it and attends over the whole buffer with the unwritten part masked out. Why: a compiled step
    then sees the same shapes and Python values every time, so it is one graph, never recompiled,
    and CUDA graphs can replay it (the buffers are marked static). One buffer per layer, written
    by index: the compiled graph updates it in place (a write into a slice of one shared buffer
    would copy all of it every step). Zero-filled: masked entries get weight 0, and 0 * an
    uninitialised NaN would still be NaN."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.index = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        for t in (*self.k, *self.v, self.index, self.slots):
            torch._dynamo.mark_static_address(t)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def length(self) -> int:  # host sync: for checks and tests, never inside a compiled step
        return int(self.index)

    def reset(self) -> None:
        self.index.zero_()

    def indices(self, n: int, device) -> torch.Tensor:
        return self.index + torch.arange(n, device=device)

    def advance(self, n: int) -> None:
        self.index.add_(n)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """(whole key buffer, whole value buffer, [T, max_len] mask of what each new query sees)."""
        at = self.indices(k.shape[2], k.device)
        self.k[layer][:, :, at] = k
        self.v[layer][:, :, at] = v
        return self.k[layer], self.v[layer], self.slots[None, :] <= at[:, None]


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per head over a cached context, as two batched matmuls.

    For a single query the fused SDPA kernels buy nothing, and on CPU their per-call cost is
    about twice that of plain bmm; this is the hot op of every decoding step. ``mask`` [1, S]
    (the static cache's) hides the slots not written yet.
    """
    B, H, _, D = q.shape
    kk = k.reshape(B * H, -1, D)
    w = torch.bmm(q.reshape(B * H, 1, D), kk.transpose(1, 2)).mul(D ** -0.5)
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    return torch.bmm(w.softmax(dim=-1), v.reshape(B * H, -1, D)).view(B, H, 1, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            k, v, start = cache.update(layer, k, v)
            if isinstance(start, torch.Tensor):  # a static cache's mask of the written slots
                y = (_decode_attention(q, k, v, start) if T == 1 and p == 0.0 else
                     F.scaled_dot_product_attention(q, k, v, attn_mask=start, dropout_p=p))
            elif T == 1 and p == 0.0:  # one new token sees everything cached: no mask at all
                y = _decode_attention(q, k, v)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:  # a chunk after a cached prefix: causal, aligned to the bottom right
                end = start + T
                qi = torch.arange(start, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= qi
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.out = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block; ``checkpoint`` recomputes it in backward to save activations."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)
        self.checkpoint = False

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class TransformerStack(nn.Module):
    """A causal stack of blocks; with a cache it appends the given tokens after the cached ones."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.n_head, self.head_dim = n_head, n_embd // n_head

    def new_cache(self, batch: int, max_len: int, device, dtype, static: bool = False) -> KVCache:
        kind = StaticKVCache if static else KVCache
        return kind(len(self.blocks), batch, self.n_head, max_len, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if block.checkpoint and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return x


class Head(nn.Module):
    """LayerNorm then a bias-free projection to logits (the official heads' shape)."""

    def __init__(self, n_embd: int, n_out: int):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd)
        self.proj = nn.Linear(n_embd, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(x))
