"""Optimizer recipe: decay groups and the warmup + cosine schedule."""
from __future__ import annotations

import pytest

from mqscale.config import OptimConfig
from mqscale.models import Stackformer
from mqscale.train.optim import lr_at, param_groups
from tests.conftest import model_cfg


def test_no_decay_on_biases_norms_embeddings():
    m = Stackformer(model_cfg())
    decay, no_decay = param_groups(m, 0.01)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert all(n.endswith("weight") and ("qkv" in n or "proj" in n or "mlp" in n) for n in decayed)
    for n in ("code_emb.weight", "pos_emb.weight", "cond_emb.weight", "abs_emb.weight",
              "code_transformer.blocks.0.ln1.weight", "code_transformer.blocks.0.attn.qkv.bias"):
        assert n in exempt
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_schedule_warmup_then_cosine_to_floor():
    o = OptimConfig(lr=1.0, min_lr_ratio=0.0005, warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.5 * (1 + 0.0005))
    assert lr_at(110, o, 110) == pytest.approx(0.0005)
    lrs = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
