"""Algorithm 1 of the paper: alternately sample the next code and its position, with a KV cache.

Each step feeds one new token to each stack (the caches hold the rest), so a sequence of L
costs O(L) token-layers instead of the O(L^2) of re-running the whole prefix every step as the
official sampler does (``sample_recompute`` keeps that path, for tests and the benchmark).

Positions: a position is never sampled twice, and with ``raster=True`` (the default, matching
how the model was trained) each next position comes after the previous one and leaves room for
the tokens still to come: step t of L may use positions in (prev, G - L + t]. The official
sampler has neither the ordering nor the room constraint.

Classifier-free guidance (``guidance=s``): the conditional rows and as many null-condition rows
go through each step as one batch of 2B, with one KV cache per stack holding both halves, and
each head's logits are mixed as cond + s * (cond - uncond) before the draw; the drawn token is
fed to both halves. ``guidance=0`` runs the doubled batch and draws exactly what conditional
sampling draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mqscale.models.stackformer.model import Stackformer


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0   # 0 means greedy (argmax)
    top_k: int = 0             # 0 means off
    top_p: float = 1.0         # 1.0 means off

    def __post_init__(self):
        # out-of-range values do not fail loudly later: a negative temperature inverts the
        # distribution and top_p = 0 would zero every probability (and draw the last id)
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


# What ``python -m mqscale.sample`` draws with no sampling flags, and what training's sample grids
# and quality curve draw, so the numbers logged during training are those of the images users get.
# (Measured on the demo: see docs/quality.md. Guidance applies only to a conditional model trained
# with condition dropout, ``train.p_uncond`` > 0.)
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 0
DEFAULT_GUIDANCE = 3.0


def default_params(vocab: int | None = None) -> SamplingParams:
    k = DEFAULT_TOP_K if vocab is None else min(DEFAULT_TOP_K, vocab)
    return SamplingParams(temperature=DEFAULT_TEMPERATURE, top_k=k)


def draw(logits: torch.Tensor, params: SamplingParams, allowed: torch.Tensor | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of [B, V] logits, restricted to ``allowed`` [B, V] where given.

    The distribution of temperature, then top-k, then top-p (nucleus) filtering of the full
    logits, but drawn among the top-k candidates only: on CPU a full-width sort or mask costs more
    than the model step itself.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    V = logits.shape[-1]
    idx = None
    if params.top_k and params.top_k < V:
        # the nucleus needs the candidates in descending order; plain top-k does not (unsorted
        # topk costs a fifth less on CPU, where it is a large part of a decoding step)
        logits, idx = torch.topk(logits, params.top_k, dim=-1, sorted=params.top_p < 1.0)
    elif params.top_p < 1.0:
        logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs                   # mass ahead of each entry
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    j = inverse_cdf(probs, generator)
    return j if idx is None else idx.gather(1, j[:, None]).squeeze(1)


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from [B, V] probabilities with a single uniform per row.

    Same distribution as ``torch.multinomial(probs, 1)``, which on CPU spends most of a decoding
    step drawing V exponentials per row."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def allowed_positions(used: torch.Tensor, prev: torch.Tensor, t: int, L: int,
                      raster: bool) -> torch.Tensor:
    """[B, G] mask of positions step t may take: unused, and in raster mode after ``prev``."""
    if not raster:
        return ~used
    G = used.shape[1]
    idx = torch.arange(G, device=used.device)
    return (idx[None, :] > prev[:, None]) & (idx[None, :] <= G - L + t)


class _Positions:
    """Bookkeeping of the positions sampled so far, per batch row."""

    def __init__(self, batch: int, G: int, L: int, raster: bool, device):
        self.used = torch.zeros(batch, G, dtype=torch.bool, device=device)
        self.prev = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.L, self.raster = L, raster

    def allowed(self, t: int) -> torch.Tensor:
        return allowed_positions(self.used, self.prev, t, self.L, self.raster)

    def take(self, pos: torch.Tensor) -> None:
        self.used.scatter_(1, pos[:, None], True)
        self.prev = pos


def _setup(model: Stackformer, cond, batch, seq_len):
    if cond is not None:
        batch = cond.shape[0]
    if batch is None:
        raise ValueError("give cond, or batch for an unconditional model")
    L = seq_len or model.cfg.seq_len
    if model.cfg.prefix_len + L - 1 > model.block_size:
        raise ValueError(f"seq_len {L} does not fit block_size {model.block_size}")
    if L > model.cfg.n_positions:
        raise ValueError(f"seq_len {L} is over the {model.cfg.n_positions} grid positions")
    return batch, L, next(model.parameters()).device


class _Guidance:
    """Doubling of the batch into [cond; null] rows and the mixing of their logits."""

    def __init__(self, model: Stackformer, scale: float | None):
        if scale is not None and model.cfg.cond == "none":
            raise ValueError("classifier-free guidance needs a class- or text-conditional model")
        self.scale = scale

    @property
    def on(self) -> bool:
        return self.scale is not None

    def prefix(self, model: Stackformer, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        if self.on:
            cond = torch.cat([cond, model.null_condition(cond)])
        return model.prefix(cond, 2 * batch if self.on else batch)

    def expand(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids drawn for the B conditional rows -> the ids fed to every row."""
        return torch.cat([ids, ids]) if self.on else ids

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return logits
        c, u = logits.float().chunk(2)
        return c + self.scale * (c - u)


def _split(model: Stackformer, a, b):
    """Map (first-stack thing, second-stack thing) to (code thing, position thing); and back."""
    return (a, b) if model.code_first else (b, a)


def _masks(model: Stackformer, allowed_pos: torch.Tensor):
    """(first, second) stack masks: only the position draw is restricted."""
    return (None, allowed_pos) if model.code_first else (allowed_pos, None)


@torch.no_grad()
def sample(model: Stackformer, cond: torch.Tensor | None = None, *, batch: int | None = None,
           seq_len: int | None = None, code: SamplingParams = SamplingParams(),
           pos: SamplingParams = SamplingParams(), raster: bool = True,
           generator: torch.Generator | None = None, guidance: float | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-cached sampling. Returns codes [B, L] and positions [B, L] (raster order when raster).

    ``guidance``: None samples the condition alone; a scale s runs classifier-free guidance."""
    B, L, device = _setup(model, cond, batch, seq_len)
    guide = _Guidance(model, guidance)
    rows = 2 * B if guide.on else B
    was_training = model.training
    model.eval()
    try:
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else next(model.parameters()).dtype)
        first_cache = model.first.new_cache(rows, model.cfg.prefix_len + L - 1, device, dtype)
        second_cache = model.second.new_cache(rows, L, device, dtype)
        first_params, second_params = _split(model, code, pos)
        book = _Positions(B, model.cfg.n_positions, L, raster, device)
        codes = torch.empty(B, L, dtype=torch.long, device=device)
        positions = torch.empty(B, L, dtype=torch.long, device=device)
        x = guide.prefix(model, cond, B)
        for t in range(L):
            h = model.first_stream(x, first_cache)[:, -1:]
            first_allowed, second_allowed = _masks(model, book.allowed(t))
            a = draw(guide.mix(model.first_logits(h)[:, 0]), first_params, first_allowed, generator)
            g = model.second_stream(h, guide.expand(a)[:, None], second_cache)
            b = draw(guide.mix(model.second_logits(g)[:, 0]), second_params, second_allowed, generator)
            codes[:, t], positions[:, t] = _split(model, a, b)
            book.take(positions[:, t])
            x = model.token_embedding(guide.expand(codes[:, t:t + 1]),
                                      guide.expand(positions[:, t:t + 1]))
        return codes, positions
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_recompute(model: Stackformer, cond: torch.Tensor | None = None, *,
                     batch: int | None = None, seq_len: int | None = None,
                     code: SamplingParams = SamplingParams(), pos: SamplingParams = SamplingParams(),
                     raster: bool = True, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official sampler's cost model, with our masks: no cache, and every step re-runs the
    first stack over the whole prefix twice (once for the first token, once more with the second
    stack), then the second stack over all image steps, and applies the heads at every position
    before keeping the last. Same draws as ``sample`` for a seed."""
    B, L, device = _setup(model, cond, batch, seq_len)
    was_training = model.training
    model.eval()
    try:
        first_params, second_params = _split(model, code, pos)
        book = _Positions(B, model.cfg.n_positions, L, raster, device)
        codes = torch.empty(B, L, dtype=torch.long, device=device)
        positions = torch.empty(B, L, dtype=torch.long, device=device)
        pre = model.prefix(cond, B)
        P = pre.shape[1]
        for t in range(L):
            x = torch.cat([pre, model.token_embedding(codes[:, :t], positions[:, :t])], dim=1)
            h = model.first_stream(x)[:, P - 1:]
            first_allowed, second_allowed = _masks(model, book.allowed(t))
            a = draw(model.first_logits(h)[:, -1], first_params, first_allowed, generator)
            h = model.first_stream(x)[:, P - 1:]  # the official second pass re-runs this stack
            done = codes[:, :t] if model.code_first else positions[:, :t]
            g = model.second_stream(h, torch.cat([done, a[:, None]], dim=1))
            b = draw(model.second_logits(g)[:, -1], second_params, second_allowed, generator)
            codes[:, t], positions[:, t] = _split(model, a, b)
            book.take(positions[:, t])
        return codes, positions
    finally:
        model.train(was_training)
