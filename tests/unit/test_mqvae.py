"""MQ-VAE: shapes, the mask, the de-mask constraint, the EMA codebook, round trips, learning."""
from __future__ import annotations

import copy

import pytest
import torch

from mqscale.core.errors import ArtifactError
from mqscale.models.mqvae.masking import Demask
from mqscale.models.mqvae.model import MQVAE
from mqscale.models.mqvae.quantizer import EMAQuantizer
from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config
from mqscale.train.config import STACKFORMER

DEBUG = "configs/mqvae/debug.yaml"


def cfg(*overrides):
    return load_tokenizer_config(DEBUG, list(overrides))


def imgs(n=2, res=64, seed=0):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("levels,res,grid", [([1, 1, 1, 2], 64, 8), ([1, 1, 1, 1, 2], 64, 4), ([1, 2, 2], 64, 16)])
def test_shapes_for_f8_and_f16(levels, res, grid):
    c = cfg(f"model.ch_mult={levels}", f"model.resolution={res}", f"data.resolution={res}")
    m = MQVAE(c.model)
    assert c.model.grid == grid and c.model.factor == res // grid
    out = m(imgs(2, res))
    assert out.recon.shape == (2, 3, res, res)
    assert out.encoded.codes.shape == out.encoded.positions.shape == (2, c.model.keep)
    assert out.encoded.scores.shape == (2, grid, grid)


def test_exactly_k_unique_ascending_positions():
    m = MQVAE(cfg().model)
    enc = m(imgs(4)).encoded
    assert enc.positions.shape == (4, 64)
    assert (enc.positions.diff(dim=1) > 0).all()
    assert ((enc.positions >= 0) & (enc.positions < 256)).all()
    # the kept cells are the top-scored ones
    flat = enc.scores.view(4, -1)
    kth = flat.topk(64, dim=1).values[:, -1:]
    assert (flat.gather(1, enc.positions) >= kth).all()


def test_random_mask_variant():
    m = MQVAE(cfg("model.mask_type=random").model)
    enc = m(imgs(2)).encoded
    assert enc.positions.shape == (2, 64) and (enc.positions.diff(dim=1) > 0).all()


@pytest.mark.parametrize("mask_type", ["adaptive", "random"])
def test_every_parameter_the_optimizer_gets_is_trained(mask_type):
    """No dead weights: the random mask has no score net, so nothing of one goes to Adam."""
    m = MQVAE(cfg(f"model.mask_type={mask_type}").model)
    x = imgs(2)
    out = m(x)
    (((out.recon - x) ** 2).mean() + out.commit_loss).backward()
    # the score net's last conv feeds a BatchNorm, which removes any constant shift in training
    # mode: that conv's bias gets a zero gradient (exactly, or rounding noise) by construction; it
    # stays for the official checkpoints' sake and matters in eval mode (the running mean)
    shadowed = {"masker.score_net.3.bias"} if mask_type == "adaptive" else set()
    grads = dict(m.named_parameters())
    idle = [n for n, p in grads.items() if n not in shadowed and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert idle == []
    assert all(grads[n].grad is None or grads[n].grad.abs().sum() < 1e-5 for n in shadowed)
    assert (m.masker.score_net is None) == (mask_type == "random")


def test_score_net_learns_through_the_reconstruction_loss():
    m = MQVAE(cfg().model)
    x = imgs(2)
    out = m(x)
    ((out.recon - x) ** 2).mean().backward()
    g = m.masker.score_net[1].weight.grad
    assert g is not None and g.abs().sum() > 0


class _PoisonCell(torch.nn.Module):
    """Wraps a value projection and adds a large vector at one cell: what a key there carries."""

    def __init__(self, inner, cell):
        super().__init__()
        self.inner, self.cell = inner, cell

    def forward(self, x):
        y = self.inner(x).clone()
        y[:, :, self.cell[0], self.cell[1]] += 100.0
        return y


def test_demask_attention_ignores_dropped_keys_at_the_first_layer():
    torch.manual_seed(0)
    d = Demask(codebook_dim=8, out_dim=32, grid=4, n_layer=1, mask_init=1e-12).eval()
    pos = torch.tensor([[1, 5, 10]])                      # cell 0 (row 0, col 0) is dropped
    x, keep = d.scatter(torch.randn(1, 3, 8), pos)
    h = d.layers[0].resblock(d.conv_in(d.post_projection(x)))
    attn = d.layers[0].attn
    w = keep + d.mask_init * (1 - keep)
    clean = attn(h, key_weight=w)
    attn.v = _PoisonCell(attn.v, (0, 0))
    assert (attn(h, key_weight=w) - clean).abs().max() < 1e-6     # the dropped key adds nothing
    full = torch.ones_like(w)
    attn.v = attn.v.inner
    base = attn(h, key_weight=full)
    attn.v = _PoisonCell(attn.v, (0, 0))
    assert (attn(h, key_weight=full) - base).abs().max() > 1e-2   # unless its weight is 1


def test_real_demask_forward_hides_dropped_values_and_follows_the_sqrt_schedule():
    """Demask.forward itself, mask_init -> 0. What the constraint promises: at the first layer a
    dropped cell contributes nothing as a key, i.e. nothing of its value reaches any query. Dropped
    keys do keep their share of each softmax (weights multiply, they are not renormalised), and the
    3x3 convs before attention spread the mask token into kept neighbours, so changing the mask
    token itself may move outputs; the values behind dropped keys are what must not. So: (1) the
    first layer's attention output equals a manual attention over kept keys only, with Demask's own
    weights; (2) a large poison added to the value projection at dropped cells only, reachable by a
    query solely through those keys, changes no output, while with mask_init = 1 it does; (3) the
    key weights handed to the layers are 1 at kept cells and mask_init^(1/2^i) at dropped ones."""
    torch.manual_seed(0)
    d = Demask(codebook_dim=8, out_dim=32, grid=4, n_layer=3, mask_init=1e-12).eval()
    quant, pos = torch.randn(2, 5, 8), torch.tensor([[0, 3, 6, 9, 15], [1, 2, 7, 12, 13]])
    keep = torch.zeros(2, 16).scatter(1, pos, 1.0)
    dropped = (1 - keep).view(2, 1, 4, 4)

    def run(demask, poison=0.0):
        """Demask.forward with every attention's (key_weight, input, output) recorded, and
        ``poison`` added to the first layer's value projection at dropped cells."""
        seen, hooks = [], [layer.attn.register_forward_hook(
            lambda m, a, kw, out: seen.append((kw["key_weight"], a[0], out)), with_kwargs=True)
            for layer in demask.layers]
        hooks.append(demask.layers[0].attn.v.register_forward_hook(lambda m, a, out: out + poison * dropped))
        with torch.no_grad():
            out = demask(quant, pos)
        for hk in hooks:
            hk.remove()
        return seen, out

    seen, clean = run(d)
    for i, (w, _, _) in enumerate(seen):           # (3) the sqrt schedule, built from the positions
        assert torch.allclose(w, keep + 1e-12 ** (0.5 ** i) * (1 - keep), rtol=1e-4, atol=0), i
    _, h, y0 = seen[0]
    attn = d.layers[0].attn                        # (1) manual attention over kept keys only
    with torch.no_grad():
        q, k, v = (m(attn.norm(h)).flatten(2).transpose(1, 2) for m in (attn.q, attn.k, attn.v))
        probs = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1) * keep[:, None, :]
        manual = h + attn.proj_out((probs @ v).transpose(1, 2).reshape(2, 32, 4, 4))
    assert torch.allclose(y0, manual, atol=1e-5)
    poisoned, out = run(d, poison=100.0)           # (2) poison behind the dropped keys
    assert (poisoned[0][2] - y0).abs().max() < 1e-6 and (out - clean).abs().max() < 1e-6
    unconstrained = Demask(codebook_dim=8, out_dim=32, grid=4, n_layer=3, mask_init=1.0).eval()
    unconstrained.load_state_dict(d.state_dict())
    assert (run(unconstrained, 100.0)[0][0][2] - run(unconstrained)[0][0][2]).abs().max() > 1.0


def test_attention_weight_multiplies_without_renormalising():
    torch.manual_seed(1)
    d = Demask(codebook_dim=8, out_dim=32, grid=2, n_layer=1).eval()
    attn = d.layers[0].attn
    h = torch.randn(1, 32, 2, 2)
    w = torch.tensor([[1.0, 0.5, 0.25, 0.1]])
    n = attn.norm(h)
    q, k, v = (m(n).flatten(2)[0].t() for m in (attn.q, attn.k, attn.v))
    probs = torch.softmax(q @ k.t() / 32 ** 0.5, dim=-1) * w          # not renormalised
    expected = h + attn.proj_out((probs @ v).t().reshape(1, 32, 2, 2))
    assert torch.allclose(attn(h, key_weight=w), expected, atol=1e-5)


@pytest.mark.parametrize("name,grid,length", [("f8_r25", 32, 256), ("f16_r50", 16, 128),
                                              ("f8_r30", 32, 307)])   # L = int(0.3 * 1024), rounded down
def test_paper_configs_give_their_grid_and_length(name, grid, length):
    c = load_tokenizer_config(f"configs/mqvae/{name}.yaml").model
    assert (c.resolution, c.grid, c.keep) == (256, grid, length)
    assert c.factor == 256 // grid and c.keep == int(c.mask_ratio * grid * grid)


def test_ema_codebook_moves_and_dead_codes_restart():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=16, dim=4, decay=0.5)
    before = q.embed.clone()
    x = torch.randn(64, 4) + 3.0                 # far from the tiny initial codebook
    out = q(x)
    assert not torch.equal(before, q.embed)
    assert out.restarts > 0                      # most codes got no vector: restarted
    assert (q.cluster_size >= 1.0).all()
    # restarted codes sit on the data now
    assert (q.embed.norm(dim=1) > 2).float().mean() > 0.8
    q.eval()
    frozen = q.embed.clone()
    q(x)
    assert torch.equal(frozen, q.embed)          # no EMA in eval mode


def test_padding_rows_never_become_restart_vectors_and_counts_stay_tensors():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=16, dim=4, decay=0.9)   # 5 vectors * 0.1 < 1: every code is dead
    real = torch.randn(5, 4) + 3.0                # fewer real vectors than codes: tiled, with noise
    junk = torch.full((7, 4), -50.0)
    out = q(torch.cat([real, junk]), weight=torch.cat([torch.ones(5), torch.zeros(7)]))
    assert isinstance(out.restarts, torch.Tensor) and out.restarts.ndim == 0
    restarted = q.cluster_size == 1.0
    assert out.restarts.item() == restarted.sum().item() == 16
    near = torch.cdist(q.embed_sum[restarted], real).min(dim=1).values
    assert near.max() < 0.01                      # a real vector plus at most 0.01 / sqrt(d) noise
    assert (near > 0).all()                       # ... and the noise is there (5 < 16 vectors)


def test_a_padding_only_first_step_leaves_the_fresh_codebook_as_it_was():
    """Nothing learnt yet (counts 0): the smoothed sizes are 0 and embed_sum / size is NaN; that
    branch must never reach the codebook."""
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=8, dim=4)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(torch.randn(6, 4), weight=torch.zeros(6))
    assert out.restarts.item() == 0
    for k, v in q.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_usage_and_perplexity():
    q = EMAQuantizer(codebook_size=8, dim=4)
    used, ppl = q.usage(torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]]))
    assert used.item() == pytest.approx(0.5) and ppl.item() == pytest.approx(4.0)


def test_straight_through_gradient_and_commitment():
    q = EMAQuantizer(codebook_size=8, dim=4)
    x = torch.randn(10, 4, requires_grad=True)
    out = q(x)
    out.quantized.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))
    assert out.commit_loss.item() > 0


def test_encode_decode_equals_reconstruct_and_training_forward_in_eval():
    m = MQVAE(cfg().model).eval()
    x = imgs(3)
    enc = m.encode(x)
    a = m.decode(enc.codes, enc.positions)
    assert torch.allclose(a, m.reconstruct(x))
    assert torch.allclose(a, m(x).recon, atol=1e-5)
    shuffled = torch.randperm(enc.codes.shape[1])
    assert torch.allclose(a, m.decode(enc.codes[:, shuffled], enc.positions[:, shuffled]), atol=1e-5)


def test_inference_calls_change_no_buffer_and_restore_modes():
    """encode/decode/reconstruct in train mode: eval behaviour (BatchNorm running statistics), no
    buffer moved (BatchNorm statistics, EMA codebook), and each submodule's mode given back."""
    m = MQVAE(cfg().model).train()
    m(imgs(4))                                   # statistics away from their initial values
    m.decoder.eval()                             # a mixed state, to see it restored as it was
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    x = imgs(3, seed=5)
    enc = m.encode(x)
    m.decode(enc.codes, enc.positions)
    rec = m.reconstruct(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    ref = copy.deepcopy(m).eval()
    assert torch.equal(ref.encode(x).codes, enc.codes) and torch.allclose(ref.reconstruct(x), rec)


def test_bad_inputs_get_clear_errors():
    m = MQVAE(cfg().model)
    with pytest.raises(ValueError, match="32x32; this tokenizer's config is 64x64"):
        m(imgs(1, 32))
    with pytest.raises(ValueError, match="channel count 1"):
        m(torch.zeros(1, 1, 64, 64))
    nan = imgs(1)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.encode(nan)
    with pytest.raises(ValueError, match="positions must lie"):
        m.decode(torch.zeros(1, 64, dtype=torch.long), torch.full((1, 64), 999))
    with pytest.raises(ValueError, match="positions must lie"):
        m.decode(torch.zeros(1, 64, dtype=torch.long), torch.arange(64)[None] - 1)


def test_decode_refuses_a_repeated_cell_in_a_row():
    m = MQVAE(cfg().model)
    codes = torch.zeros(3, 64, dtype=torch.long)
    pos = torch.arange(64).repeat(3, 1)
    pos[2, 10] = pos[2, 40]                       # row 2 names cell 40 twice
    with pytest.raises(ValueError, match=r"repeat a cell within a row \(rows \[2\]\)"):
        m.decode(codes, pos)
    with pytest.raises(ValueError, match="must be integer"):
        m.decode(codes, pos.float())
    with pytest.raises(ValueError, match="got L = 0"):
        m.decode(codes[:, :0], pos[:, :0])


@pytest.mark.slow
@pytest.mark.parametrize("length", [1, 10, 64, 200, 256])
def test_decode_takes_any_number_of_distinct_cells(length):
    """L need not be cfg.keep (64 here): evaluation at another kept count and samplers with their
    own seq_len decode too. Every L from 1 to the 256 grid cells gives images."""
    m = MQVAE(cfg().model)
    g = torch.Generator().manual_seed(length)
    pos = torch.stack([torch.randperm(256, generator=g)[:length] for _ in range(2)])
    codes = torch.randint(0, 256, (2, length), generator=g)
    out = m.decode(codes, pos)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    assert torch.allclose(out, m.decode(codes.flip(1), pos.flip(1)), atol=1e-5)   # order-free


@pytest.mark.slow
def test_checkpoint_round_trip(tmp_path):
    c = cfg()
    m = MQVAE(c.model)
    m(imgs(4))                                   # move the EMA and BatchNorm statistics
    m.eval()
    TOKENIZER.save(m, c, tmp_path / "tok")
    again, c2 = TOKENIZER.load(tmp_path / "tok")
    assert c2 == c
    x = imgs(2, seed=3)
    assert torch.equal(m.reconstruct(x), again.reconstruct(x))
    with pytest.raises(ArtifactError, match="not a Stackformer"):
        STACKFORMER.load(tmp_path / "tok")


def psnr(a, b):
    mse = ((a.clamp(-1, 1) - b) ** 2).mean()
    return (10 * torch.log10(4.0 / mse)).item()


@pytest.mark.slow
def test_tiny_model_overfits_eight_images():
    torch.manual_seed(0)
    c = cfg("model.resolution=32", "data.resolution=32")
    m = MQVAE(c.model)
    import numpy as np

    from data_tools.make_shapes import make_image
    x = torch.stack([torch.from_numpy(np.array(make_image(0, i, 32)[0])).permute(2, 0, 1) for i in range(8)])
    x = x.float() / 127.5 - 1
    m.eval()
    start = psnr(m.reconstruct(x), x)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.5, 0.9))
    for _ in range(100):
        out = m(x)
        loss = ((out.recon - x) ** 2).mean() + out.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    end = psnr(m.reconstruct(x), x)
    assert end > start + 5, (start, end)
