"""Classifier-free guidance mixes the position logits as it mixes the code logits.

tests/test_sampling.py checks the mix on the first code drawn. Here: the first position by hand
for both stack orders (code first: the position comes from the second stack, fed the drawn code
in both halves; position first: from the first stack), and whole guided sequences against a
reference guided sampler without a KV cache, written out below from the model's streams.
"""
from __future__ import annotations

import pytest
import torch

from mqscale.models.stackformer.sampling import allowed_positions, sample
from tests.helpers.models import GREEDY, conds, tiny


def mixed(logits_c: torch.Tensor, logits_u: torch.Tensor, s: float) -> torch.Tensor:
    return logits_c.float() + s * (logits_c.float() - logits_u.float())


@pytest.mark.parametrize("order", ["code_first", "pos_first"])
def test_first_position_is_drawn_from_the_mixed_position_logits(order):
    m = tiny(order, "class")
    c = conds(m, 4)
    s = 3.0
    with torch.no_grad():
        hc = m.first_stream(m.prefix(c, 4))[:, -1:]
        hu = m.first_stream(m.prefix(m.null_condition(c), 4))[:, -1:]
        first = mixed(m.first_logits(hc)[:, 0], m.first_logits(hu)[:, 0], s).argmax(-1)
        if order == "code_first":      # the position head is the second stack's, fed the drawn code
            ids = first[:, None]
            want = mixed(m.second_logits(m.second_stream(hc, ids))[:, 0],
                         m.second_logits(m.second_stream(hu, ids))[:, 0], s).argmax(-1)
        else:
            want = first
        plain_c = (m.second_logits(m.second_stream(hc, first[:, None]))[:, 0] if order == "code_first"
                   else m.first_logits(hc)[:, 0]).argmax(-1)
    _, positions = sample(m, c, code=GREEDY, pos=GREEDY, seq_len=1, guidance=s)
    assert torch.equal(positions[:, 0], want)
    assert not torch.equal(want, plain_c)   # the mix matters here, or the test would prove nothing


@torch.no_grad()
def guided_reference(m, cond: torch.Tensor, s: float, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy guided sampling with no cache: each step re-runs both stacks over the whole prefix,
    once with the condition and once with the null condition, and mixes each head's logits."""
    B = cond.shape[0]
    G = m.cfg.n_positions
    codes = torch.zeros(B, 0, dtype=torch.long)
    positions = torch.zeros(B, 0, dtype=torch.long)
    used = torch.zeros(B, G, dtype=torch.bool)
    prev = torch.full((B,), -1, dtype=torch.long)
    P = m.prefix(cond, B).shape[1]
    for t in range(L):
        allowed = allowed_positions(used, prev, t, L, raster=True)
        hs = [m.first_stream(torch.cat([m.prefix(k, B), m.token_embedding(codes, positions)], 1))[:, P - 1:]
              for k in (cond, m.null_condition(cond))]
        lf = mixed(m.first_logits(hs[0])[:, -1], m.first_logits(hs[1])[:, -1], s)
        if not m.code_first:
            lf = lf.masked_fill(~allowed, float("-inf"))
        a = lf.argmax(-1)
        done = torch.cat([codes if m.code_first else positions, a[:, None]], 1)
        ls = mixed(m.second_logits(m.second_stream(hs[0], done))[:, -1],
                   m.second_logits(m.second_stream(hs[1], done))[:, -1], s)
        if m.code_first:
            ls = ls.masked_fill(~allowed, float("-inf"))
        b = ls.argmax(-1)
        code, pos = (a, b) if m.code_first else (b, a)
        codes, positions = torch.cat([codes, code[:, None]], 1), torch.cat([positions, pos[:, None]], 1)
        used[torch.arange(B), pos] = True
        prev = pos
    return codes, positions


@pytest.mark.slow
@pytest.mark.parametrize("order,cond", [("code_first", "class"), ("pos_first", "class"), ("code_first", "text")])
def test_guided_sequences_equal_a_reference_mixing_both_heads_every_step(order, cond):
    m = tiny(order, cond)
    c = conds(m, 3)
    s = 2.0
    want = guided_reference(m, c, s, m.cfg.seq_len)
    got = sample(m, c, code=GREEDY, pos=GREEDY, guidance=s)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    plain = sample(m, c, code=GREEDY, pos=GREEDY)
    assert not torch.equal(plain[1], want[1])            # guidance moved some position
