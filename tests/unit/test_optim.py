"""Optimizer recipe: decay groups and the warmup + cosine schedule."""
from __future__ import annotations

import pytest
import torch

from mqscale.models.stackformer.counting import param_count
from mqscale.models.stackformer.model import Stackformer
from mqscale.train.config import OptimConfig, load_train_config
from mqscale.train.optim import lr_at, n_params, param_groups
from tests.helpers.models import DEBUG, model_cfg
from tests.helpers.training import one_rank_group


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


@pytest.mark.integration
def test_zero3_partitioned_model_keeps_decay_split_and_count():
    """Under deepspeed.zero.Init every parameter is an empty placeholder when the groups are made:
    the split must come from the real shapes, or nothing would be decayed."""
    from mqscale.train.engine import build_model, ds_config
    cfg = load_train_config(DEBUG, ["deepspeed.zero_stage=3"])
    with one_rank_group():
        model = build_model(cfg, ds_config(cfg, 1))
    assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in model.parameters())  # really partitioned
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    want = {n for n, p in model.named_parameters() if len(p.ds_shape) >= 2 and n not in embeddings}
    assert decayed == want and len(want) > 0
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - want
    plain_decay, _ = param_groups(Stackformer(cfg.model), 0.01)   # the same split as without ZeRO-3
    assert [p.shape for p in plain_decay["params"]] == [p.ds_shape for p in decay["params"]]
    assert n_params(model) == param_count(cfg.model) > 0


def test_schedule_warmup_then_cosine_to_floor():
    o = OptimConfig(lr=1.0, min_lr_ratio=0.0005, warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.5 * (1 + 0.0005))
    assert lr_at(110, o, 110) == pytest.approx(0.0005)
    lrs = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
