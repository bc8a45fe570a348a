"""Condition dropout for classifier-free guidance: ``Stackformer.drop_condition``, which the trainer
applies to every micro-batch with ``train.p_uncond`` (mqscale/train/trainer.py, ``micro_step``).

The rate is checked against a binomial bound (five standard deviations, so a correct
implementation fails about once in 3.5 million runs), the null id is the condition table's last
row, text rows are dropped whole, and a dropped row's gradient reaches the null row only.
"""
from __future__ import annotations

import glob
import math

import pytest
import torch

from mqscale.core.errors import ConfigError
from mqscale.models.stackformer.counting import condition_table_size
from mqscale.models.stackformer.model import Stackformer
from mqscale.train.config import load_train_config
from tests.helpers.models import model_cfg, raster_batch


def tiny(cond: str) -> Stackformer:
    return Stackformer(model_cfg(f"model.cond={cond}", "model.text_len=4", "model.text_vocab_size=30",
                                 "model.grid=8", "model.seq_len=16", "model.codebook_size=48",
                                 "model.n_embd=32", "model.n_head=2")).eval()


def within_binomial(k: int, n: int, p: float) -> bool:
    return abs(k - n * p) <= 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_class_rows_are_dropped_at_the_rate_to_the_null_id(p):
    m = tiny("class")
    n = 40000
    c = torch.randint(0, m.cfg.n_classes, (n,), generator=torch.Generator().manual_seed(0))
    d = m.drop_condition(c, p, torch.Generator().manual_seed(1))
    dropped = d != c
    assert m.null_id == m.cfg.n_classes == condition_table_size(m.cfg) - 1   # the table's extra, last row
    assert (d[dropped] == m.null_id).all() and torch.equal(d[~dropped], c[~dropped])
    assert within_binomial(int(dropped.sum()), n, p)
    assert d.dtype == c.dtype and d.shape == c.shape


def test_text_rows_are_dropped_whole():
    m = tiny("text")
    n = 4000
    ids = torch.randint(1, m.cfg.text_vocab_size, (n, m.cfg.text_len), generator=torch.Generator().manual_seed(0))
    d = m.drop_condition(ids, 0.25, torch.Generator().manual_seed(2))
    null_rows = (d == m.null_id).all(dim=1)
    kept_rows = (d == ids).all(dim=1)
    assert m.null_id == m.cfg.text_vocab_size
    assert bool((null_rows | kept_rows).all())               # never a partly dropped caption
    assert within_binomial(int(null_rows.sum()), n, 0.25)


def test_no_dropout_at_p_0_or_without_a_condition():
    m = tiny("class")
    c = torch.arange(m.cfg.n_classes)
    assert torch.equal(m.drop_condition(c, 0.0), c)
    u = Stackformer(model_cfg("model.cond=none", "model.grid=8", "model.seq_len=16", "model.codebook_size=48",
                              "model.n_embd=32", "model.n_head=2"))
    assert u.drop_condition(c, 0.5) is c
    with pytest.raises(ValueError, match="no null condition"):
        u.null_id


def test_same_generator_same_rows_dropped():
    m = tiny("class")
    c = torch.randint(0, m.cfg.n_classes, (500,), generator=torch.Generator().manual_seed(0))
    a = m.drop_condition(c, 0.3, torch.Generator().manual_seed(5))
    b = m.drop_condition(c, 0.3, torch.Generator().manual_seed(5))
    other = m.drop_condition(c, 0.3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, other)


def test_a_dropped_row_trains_the_null_embedding_only():
    """What the trainer feeds the model after dropout: the loss of fully dropped rows puts gradient
    on the null row of the condition table and on no class row; kept rows reach their own classes."""
    m = tiny("class").train()
    codes, positions, cond = raster_batch(m.cfg, 6, seed=3)
    m(codes, positions, cond=m.drop_condition(cond, 1.0)).loss.backward()
    rows = m.cond_emb.weight.grad.abs().sum(dim=1) > 0
    assert rows.nonzero().flatten().tolist() == [m.null_id]
    m.zero_grad()
    d = m.drop_condition(cond, 0.5, torch.Generator().manual_seed(4))
    m(codes, positions, cond=d).loss.backward()
    rows = m.cond_emb.weight.grad.abs().sum(dim=1) > 0
    assert set(rows.nonzero().flatten().tolist()) == set(d.tolist())


def test_class_conditional_configs_train_with_p_uncond_0_1():
    paths = sorted(glob.glob("configs/stackformer/*.yaml")) + ["configs/demo.yaml"]
    assert len(paths) >= 7
    for path in paths:
        cfg = load_train_config(path)
        if cfg.model.cond != "none":
            assert cfg.train.p_uncond == pytest.approx(0.1), path
    with pytest.raises(ConfigError, match="train.p_uncond"):
        load_train_config("configs/stackformer/debug.yaml", ["model.cond=none", "train.p_uncond=0.1"])
