"""Stackformer: shapes, causality in both streams and orders, counts, checkpointing, learning."""
from __future__ import annotations

import pytest
import torch

from mqscale.models.stackformer.counting import param_count, train_flops_per_token
from mqscale.models.stackformer.model import Stackformer
from mqscale.train.config import load_train_config
from tests.helpers.models import model_cfg, raster_batch

VARIANTS = [
    ("code_first", "class"), ("pos_first", "class"), ("code_first", "text"),
    ("code_first", "none"), ("pos_first", "text"),
]


def small(order="code_first", cond="class", *extra):
    return model_cfg(f"model.order={order}", f"model.cond={cond}", "model.text_len=5",
                     "model.text_vocab_size=50", "model.grid=8", "model.seq_len=12",
                     "model.codebook_size=40", "model.n_embd=32", "model.n_head=4", *extra)


@pytest.mark.parametrize("order,cond", VARIANTS)
def test_shapes_and_losses(order, cond):
    cfg = small(order, cond)
    m = Stackformer(cfg)
    codes, pos, c = raster_batch(cfg, 3)
    out = m(codes, pos, cond=c)
    assert out.code_logits.shape == (3, cfg.seq_len, cfg.codebook_size)
    assert out.pos_logits.shape == (3, cfg.seq_len, cfg.n_positions)
    assert torch.allclose(out.loss, out.code_loss + cfg.pos_loss_weight * out.pos_loss)
    # untrained: both cross-entropies sit near log(vocab)
    assert abs(out.code_loss.item() - torch.log(torch.tensor(40.0)).item()) < 0.5
    assert abs(out.pos_loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5
    nolo = m(codes, pos, cond=c, compute_loss=False)
    assert nolo.loss is None and torch.equal(nolo.code_logits, out.code_logits)


def test_position_loss_weight_lambda():
    cfg = small("code_first", "class", "model.pos_loss_weight=0.25")
    m = Stackformer(cfg)
    codes, pos, c = raster_batch(cfg, 2)
    out = m(codes, pos, cond=c)
    assert torch.allclose(out.loss, out.code_loss + 0.25 * out.pos_loss)


@pytest.mark.parametrize("order,cond", VARIANTS)
@pytest.mark.parametrize("what", ["codes", "positions"])
def test_causality(order, cond, what):
    cfg = small(order, cond)
    m = Stackformer(cfg).eval()
    codes, pos, c = raster_batch(cfg, 2)
    k = 5
    base = m(codes, pos, cond=c, compute_loss=False)
    codes2, pos2 = codes.clone(), pos.clone()
    if what == "codes":
        codes2[:, k:] = (codes2[:, k:] + 7) % cfg.codebook_size
    else:
        pos2[:, k:] = (pos2[:, k:] + 3) % cfg.n_positions
    new = m(codes2, pos2, cond=c, compute_loss=False)
    for name in ("code_logits", "pos_logits"):
        a, b = getattr(base, name), getattr(new, name)
        assert torch.equal(a[:, :k], b[:, :k]) or torch.allclose(a[:, :k], b[:, :k], atol=1e-6), name
    # not vacuous: what is predicted after the change does move
    assert not torch.allclose(base.code_logits[:, k + 1:], new.code_logits[:, k + 1:])
    # the second stack sees the first-stack target of its own step
    second_same_step = base.pos_logits if order == "code_first" else base.code_logits
    second_same_step_new = new.pos_logits if order == "code_first" else new.code_logits
    changed_first_target = (what == "codes") == (order == "code_first")
    moved = not torch.allclose(second_same_step[:, k], second_same_step_new[:, k])
    assert moved == changed_first_target


def test_condition_changes_the_logits():
    cfg = small()
    m = Stackformer(cfg).eval()
    codes, pos, _ = raster_batch(cfg, 2)
    a = m(codes, pos, cond=torch.tensor([1, 1]), compute_loss=False).code_logits
    b = m(codes, pos, cond=torch.tensor([2, 2]), compute_loss=False).code_logits
    assert not torch.allclose(a, b)


def test_absolute_embedding_switch():
    on, off = Stackformer(small()), Stackformer(small("code_first", "class", "model.abs_pos=false"))
    assert on.abs_emb is not None and off.abs_emb is None
    assert param_count(on.cfg) - param_count(off.cfg) == on.cfg.resolved_block_size * on.cfg.n_embd


@pytest.mark.parametrize("order,cond", VARIANTS)
def test_analytic_param_count_matches_the_module(order, cond):
    cfg = small(order, cond)
    assert sum(p.numel() for p in Stackformer(cfg).parameters()) == param_count(cfg)


@pytest.mark.parametrize("name,target", [("307m", 307e6), ("607m", 607e6)])
def test_paper_sizes_within_one_percent(name, target):
    cfg = load_train_config(f"configs/stackformer/{name}.yaml").model
    with torch.device("meta"):
        n = sum(p.numel() for p in Stackformer(cfg).parameters())
    assert n == param_count(cfg)
    assert abs(n - target) / target < 0.01, n


def test_flops_per_token_is_about_six_times_params():
    cfg = load_train_config("configs/stackformer/307m.yaml").model
    ratio = train_flops_per_token(cfg) / param_count(cfg)
    assert 6.0 < ratio < 6.6  # 6N plus attention over 256 tokens, minus free embedding lookups


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = small()
    a = Stackformer(cfg)
    b = Stackformer(cfg)
    b.load_state_dict(a.state_dict())
    b.set_activation_checkpointing(True)
    codes, pos, c = raster_batch(cfg, 2)
    a(codes, pos, cond=c).loss.backward()
    b(codes, pos, cond=c).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    b.set_activation_checkpointing([0])
    flags = [blk.checkpoint for blk in list(b.code_transformer.blocks) + list(b.pos_transformer.blocks)]
    assert flags == [True] + [False] * (len(flags) - 1)


def test_bad_inputs_are_clear():
    m = Stackformer(small())
    codes, pos, c = raster_batch(m.cfg, 2)
    with pytest.raises(ValueError, match="needs cond"):
        m(codes, pos)
    with pytest.raises(ValueError, match="differ"):
        m(codes, pos[:, :-1], cond=c)
    long = torch.zeros(2, m.cfg.seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        m(long, long, cond=c)


@pytest.mark.slow
def test_tiny_model_overfits_a_few_sequences():
    cfg = small()
    m = Stackformer(cfg)
    codes, pos, c = raster_batch(cfg, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = m(codes, pos, cond=c).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_models_package_imports_nothing_distributed():
    import ast
    from pathlib import Path
    banned = {"deepspeed", "ray", "torch.distributed"}
    for f in (Path(__file__).resolve().parents[2] / "mqscale" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert not any(n == b or n.startswith(b + ".") for b in banned), f"{f}: imports {n}"
