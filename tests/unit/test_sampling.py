"""Algorithm 1 sampler: cached == recompute, seeding, position rules, filtering."""
from __future__ import annotations

import pytest
import torch

from mqscale.models.stackformer.sampling import (
    SamplingParams,
    allowed_positions,
    draw,
    inverse_cdf,
    sample,
    sample_recompute,
)
from tests.helpers.models import GREEDY, conds, filter_logits, tiny

VARIANTS = [("code_first", "class"), ("pos_first", "class"), ("code_first", "text"),
            ("code_first", "none")]


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


@pytest.mark.slow
@pytest.mark.parametrize("order,cond", VARIANTS)
def test_cached_greedy_equals_full_prefix_recompute(order, cond):
    m = tiny(order, cond)
    c = conds(m)
    kw = dict(batch=3, code=GREEDY, pos=GREEDY)
    a = sample(m, c, **kw)
    b = sample_recompute(m, c, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.slow
@pytest.mark.parametrize("order,cond", VARIANTS)
@pytest.mark.parametrize("raster", [True, False])
def test_same_seed_same_samples_cached_or_not(order, cond, raster):
    m = tiny(order, cond)
    c = conds(m)
    p = SamplingParams(temperature=1.3, top_k=20, top_p=0.95)
    a = sample(m, c, batch=3, code=p, pos=p, raster=raster, generator=gen())
    b = sample(m, c, batch=3, code=p, pos=p, raster=raster, generator=gen())
    r = sample_recompute(m, c, batch=3, code=p, pos=p, raster=raster, generator=gen())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], r[0]) and torch.equal(a[1], r[1])
    other = sample(m, c, batch=3, code=p, pos=p, raster=raster, generator=gen(8))
    assert not torch.equal(a[0], other[0])


def test_cached_logits_match_the_training_forward():
    """Teacher-force the sampled sequence: the full forward must give the same argmax choices."""
    m = tiny()
    c = conds(m)
    codes, pos = sample(m, c, code=GREEDY, pos=GREEDY, raster=False)
    out = m(codes, pos, cond=c, compute_loss=False)
    assert torch.equal(out.code_logits.argmax(-1), codes)
    # positions: greedy over the not-yet-used ones
    logits = out.pos_logits.clone()
    for t in range(1, codes.shape[1]):
        logits[:, t].scatter_(1, pos[:, :t], float("-inf"))
    assert torch.equal(logits.argmax(-1), pos)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["code_first", "pos_first"])
def test_positions_never_repeat_and_raster_holds(order):
    m = tiny(order, "class", "model.seq_len=40")  # 40 of 64 cells: the room constraint matters
    c = conds(m, 8)
    hot = SamplingParams(temperature=2.0)
    codes, pos = sample(m, c, code=hot, pos=hot, generator=gen())
    assert (pos.diff(dim=1) > 0).all()
    assert ((0 <= pos) & (pos < 64)).all() and ((0 <= codes) & (codes < 48)).all()
    codes, pos = sample(m, c, code=hot, pos=hot, raster=False, generator=gen())
    for row in pos:
        assert len(set(row.tolist())) == row.numel()
    assert not (pos.diff(dim=1) > 0).all()  # free order really is free


@pytest.mark.slow
def test_full_grid_with_raster_is_exactly_every_position():
    m = tiny("code_first", "class", "model.seq_len=64")
    _, pos = sample(m, conds(m, 2), generator=gen())
    assert torch.equal(pos, torch.arange(64).expand(2, 64))


def test_allowed_positions_leaves_room():
    used = torch.zeros(1, 10, dtype=torch.bool)
    used[0, 2] = True
    prev = torch.tensor([2])
    a = allowed_positions(used, prev, t=1, L=4, raster=True)  # 3 more tokens after this one
    assert a[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    b = allowed_positions(used, prev, t=1, L=4, raster=False)
    assert b[0].nonzero().flatten().tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    k2 = filter_logits(logits, SamplingParams(top_k=2))
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.25 reaches 0.7
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    tiny_p = filter_logits(logits, SamplingParams(top_p=0.01))
    assert torch.isfinite(tiny_p[0, 0]) and torch.isinf(tiny_p[0, 1:]).all()
    t = filter_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(t, logits / 0.5)


@pytest.mark.parametrize("params", [SamplingParams(top_k=2), SamplingParams(top_p=0.7),
                                    SamplingParams(top_p=0.01), SamplingParams(top_k=3, top_p=0.6),
                                    SamplingParams(temperature=0.5, top_k=3)])
def test_draw_samples_exactly_the_filtered_distribution(params):
    """The sampler's draw (top-k/top-p among candidates only) follows softmax(filter_logits)."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]])).expand(20000, 4)
    ids = draw(logits, params, generator=gen(3))
    want = torch.softmax(filter_logits(logits[:1], params), dim=-1)[0]
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert (freq[want == 0] == 0).all()                    # nothing outside the kept set
    assert torch.allclose(freq, want, atol=0.015)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")),
                                 dict(top_k=-3), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5)])
def test_sampling_params_refuse_values_that_would_draw_wrong_ids(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["code_first", "pos_first"])
def test_codes_and_positions_take_their_own_settings(order):
    """Greedy codes with hot positions: every code is the argmax given the sampled prefix, while
    the positions vary with the seed."""
    m = tiny(order)
    c = conds(m, 4)
    hot = SamplingParams(temperature=2.0)
    codes, pos = sample(m, c, code=GREEDY, pos=hot, generator=gen(1))
    out = m(codes, pos, cond=c, compute_loss=False)
    if order == "code_first":  # code t is predicted before position t: its argmax is exact
        assert torch.equal(out.code_logits.argmax(-1), codes)
    _, pos2 = sample(m, c, code=GREEDY, pos=hot, generator=gen(2))
    assert not torch.equal(pos, pos2)
    codes_g, pos_g = sample(m, c, code=hot, pos=GREEDY, generator=gen(1))
    out = m(codes_g, pos_g, cond=c, compute_loss=False)
    if order == "pos_first":
        assert torch.equal(out.pos_logits.masked_fill(
            ~_raster_allowed(pos_g, m.cfg.n_positions), float("-inf")).argmax(-1), pos_g)


def _raster_allowed(pos: torch.Tensor, G: int) -> torch.Tensor:
    """[B, L, G]: the positions the raster rule allowed at each step of these sequences."""
    B, L = pos.shape
    prev = torch.cat([torch.full((B, 1), -1), pos[:, :-1]], dim=1)
    idx = torch.arange(G)
    t = torch.arange(L)
    return (idx[None, None] > prev[..., None]) & (idx[None, None] <= (G - L + t)[None, :, None])


@pytest.mark.slow
@pytest.mark.parametrize("order,cond", VARIANTS)
def test_each_cached_step_feeds_only_the_new_token(order, cond):
    m = tiny(order, cond)
    seen = {"first": [], "second": []}
    hooks = [m.first.register_forward_hook(lambda mod, a, o: seen["first"].append(a[0].shape[1])),
             m.second.register_forward_hook(lambda mod, a, o: seen["second"].append(a[0].shape[1]))]
    try:
        sample(m, conds(m), batch=3, seq_len=10, generator=gen())
    finally:
        for h in hooks:
            h.remove()
    assert seen["first"] == [m.cfg.prefix_len] + [1] * 9     # the prefix once, then one token a step
    assert seen["second"] == [1] * 10


def test_draw_respects_mask_and_greedy():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 5.0]])
    allowed = torch.tensor([[False, True, True], [True, True, False]])
    assert draw(logits, GREEDY, allowed).tolist() == [1, 1]
    for _ in range(20):
        ids = draw(logits, SamplingParams(temperature=3.0), allowed, gen(_))
        assert allowed[torch.arange(2), ids].all()


def test_inverse_cdf_draws_follow_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    ids = inverse_cdf(probs, gen(0))
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert freq[1] == 0
    assert torch.allclose(freq, probs[0], atol=0.015)


def test_sampler_leaves_the_training_flag_alone():
    m = tiny()
    m.train()
    sample(m, conds(m), seq_len=4)
    assert m.training


def test_sampler_rejects_impossible_lengths():
    m = tiny()
    with pytest.raises(ValueError, match="block_size"):
        sample(m, conds(m), seq_len=17)


# ------------------------------------------------------------------ classifier-free guidance

GUIDED = [("code_first", "class"), ("pos_first", "class"), ("code_first", "text")]


@pytest.mark.slow
@pytest.mark.parametrize("order,cond", GUIDED)
def test_guidance_scale_0_draws_what_conditional_sampling_draws(order, cond):
    m = tiny(order, cond)
    c = conds(m, 5)
    p = SamplingParams(temperature=1.2, top_k=20, top_p=0.95)
    plain = sample(m, c, code=p, pos=p, generator=gen())
    zero = sample(m, c, code=p, pos=p, generator=gen(), guidance=0.0)
    strong = sample(m, c, code=p, pos=p, generator=gen(), guidance=4.0)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    assert not torch.equal(plain[0], strong[0])       # guidance really changes the draws
    assert (strong[1].diff(dim=1) > 0).all()            # and the position rules still hold


def test_guided_sampling_runs_both_streams_in_one_batch():
    m = tiny("code_first", "class")
    c = conds(m, 3)
    seen = {"first": [], "second": []}
    hooks = [m.first.register_forward_hook(lambda mod, a, out: seen["first"].append(a[0].shape[0])),
             m.second.register_forward_hook(lambda mod, a, out: seen["second"].append(a[0].shape[0]))]
    try:
        sample(m, c, generator=gen(), guidance=2.0)
    finally:
        for h in hooks:
            h.remove()
    L = m.cfg.seq_len
    assert seen["first"] == [6] * L and seen["second"] == [6] * L   # one 2B batch per step, per stack


def test_guidance_mixes_logits_as_cond_plus_s_times_difference():
    """One guided step by hand: the first code drawn greedily from cond + s*(cond - uncond)."""
    m = tiny("code_first", "class")
    c = conds(m, 4)
    s = 3.0
    with torch.no_grad():
        lc = m.first_logits(m.first_stream(m.prefix(c, 4)))[:, -1]
        lu = m.first_logits(m.first_stream(m.prefix(m.null_condition(c), 4)))[:, -1]
    codes, _ = sample(m, c, code=GREEDY, pos=GREEDY, seq_len=1, guidance=s)
    assert torch.equal(codes[:, 0], (lc + s * (lc - lu)).argmax(-1))


def test_guidance_needs_a_conditional_model():
    m = tiny("code_first", "none")
    with pytest.raises(ValueError, match="conditional"):
        sample(m, batch=2, guidance=1.0)


def test_condition_dropout_uses_the_null_id_at_the_given_rate():
    m = tiny("code_first", "class")
    c = torch.randint(0, m.cfg.n_classes, (20000,), generator=gen())
    assert torch.equal(m.drop_condition(c, 0.0), c)
    d = m.drop_condition(c, 0.1, gen(1))
    dropped = d == m.null_id
    assert m.null_id == m.cfg.n_classes and abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(d[~dropped], c[~dropped])
    t = tiny("code_first", "text")
    ids = conds(t, 6)
    dt = t.drop_condition(ids, 0.5, gen(2))
    rows_dropped = (dt == t.null_id).all(dim=1)
    assert rows_dropped.any() and torch.equal(dt[~rows_dropped], ids[~rows_dropped])
