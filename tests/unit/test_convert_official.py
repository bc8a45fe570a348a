"""Import of official Stackformer checkpoints: logits equal the official model's within 1e-4."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mqscale.convert.official import full_config, load_stackformer
from mqscale.core.errors import ArtifactError, ConversionError
from mqscale.train.config import STACKFORMER
from tests.helpers.official_stackformer import OfficialCodeFirst

ROOT = Path(__file__).resolve().parents[2]
N_CLS, K, SIDE, HEADS = 7, 40, 6, 4
G = SIDE * SIDE


def official(code_first=True, block=G, layers=(3, 2)):
    torch.manual_seed(3)
    return OfficialCodeFirst(vocab_size=N_CLS + K, position_size=G + 1, block_size=block,
                             value_layer=layers[0], position_layer=layers[1], n_head=HEADS,
                             n_embd=32, code_first=code_first).eval()


def inputs(batch=3, L=10):
    g = torch.Generator().manual_seed(5)
    pos = torch.sort(torch.rand(batch, G, generator=g).argsort(-1)[:, :L], -1).values
    codes = torch.randint(0, K, (batch, L), generator=g)
    cls = torch.randint(0, N_CLS, (batch,), generator=g)
    return codes, pos, cls


def official_logits(ref, codes, pos, cls):
    idx = torch.cat([cls[:, None], codes + N_CLS], dim=1)
    pos_idx = torch.cat([torch.full_like(cls[:, None], G), pos], dim=1)
    with torch.no_grad():
        out = ref(idx, pos_idx)
    return out["value_logits"][..., N_CLS:], out["position_logits"][..., :G]


def convert(ref, prefix="", order="code_first"):
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    return load_stackformer(sd, n_classes=N_CLS, codebook_size=K, grid_size=G, n_head=HEADS, order=order)


@pytest.mark.parametrize("code_first,prefix", [(True, ""), (True, "transformer."), (False, "")])
def test_converted_logits_equal_official(code_first, prefix):
    """code_first=False is the official StackedPositionGPT (Stackformer_r), read with pos_first."""
    ref = official(code_first=code_first)
    ours = convert(ref, prefix, order="code_first" if code_first else "pos_first")
    assert (ours.cfg.n_code_layer, ours.cfg.n_pos_layer, ours.cfg.n_embd, ours.cfg.block_size) == (3, 2, 32, G)
    codes, pos, cls = inputs()
    code_ref, pos_ref = official_logits(ref, codes, pos, cls)
    with torch.no_grad():
        out = ours(codes, pos, cond=cls, compute_loss=False)
    assert (out.code_logits - code_ref).abs().max().item() <= 1e-4
    assert (out.pos_logits - pos_ref).abs().max().item() <= 1e-4


def test_lightning_checkpoint_extra_keys_are_ignored():
    ref = official()
    sd = {"transformer." + k: v for k, v in ref.state_dict().items()}
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
    ours = load_stackformer(sd, n_classes=N_CLS, codebook_size=K, grid_size=G, n_head=HEADS)
    assert ours.cfg.n_classes == N_CLS


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd.pop("value_emb.weight"), "missing 'value_emb.weight'"),
    (lambda sd: sd.__setitem__("value_transformer.0.attn.extra.weight", torch.zeros(1)), "does not know"),
])
def test_broken_state_dicts_are_refused_clearly(mutate, match):
    sd = dict(official().state_dict())
    mutate(sd)
    with pytest.raises(ConversionError, match=match):
        load_stackformer(sd, n_classes=N_CLS, codebook_size=K, grid_size=G, n_head=HEADS)


def test_wrong_vocabulary_sizes_are_refused():
    sd = official().state_dict()
    with pytest.raises(ConversionError, match="not n_classes \\+ codebook_size"):
        load_stackformer(sd, n_classes=N_CLS + 1, codebook_size=K, grid_size=G, n_head=HEADS)
    with pytest.raises(ConversionError, match="not a square grid"):
        load_stackformer(sd, n_classes=N_CLS, codebook_size=K, grid_size=G + 1, n_head=HEADS)


def test_export_round_trip(tmp_path):
    ours = convert(official())
    out = STACKFORMER.save(ours, full_config(ours.cfg), tmp_path / "exp")
    again, cfg = STACKFORMER.load(out)
    assert cfg.model == ours.cfg
    codes, pos, cls = inputs()
    with torch.no_grad():
        assert torch.equal(again(codes, pos, cond=cls).code_logits, ours(codes, pos, cond=cls).code_logits)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        STACKFORMER.load(out)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mqscale.convert", *args], capture_output=True,
                          text=True, cwd=ROOT)


def cli_flags():
    return ["--n-classes", str(N_CLS), "--codebook-size", str(K), "--grid-size", str(G),
            "--n-head", str(HEADS), "--seq-len", "6"]


@pytest.mark.integration
def test_cli_converts_a_plain_lightning_checkpoint(tmp_path):
    ref = official()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"transformer." + k: v for k, v in ref.state_dict().items()},
                "global_step": 10, "epoch": 1}, ckpt)
    r = run_cli("official-stackformer", str(ckpt), str(tmp_path / "out"), *cli_flags())
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["format"] == "mqscale-stackformer/1"
    assert meta["config"]["model"]["n_code_layer"] == 3
    assert meta["config"]["model"]["seq_len"] == 6  # the weights cannot tell L: --seq-len records it
    model, _ = STACKFORMER.load(tmp_path / "out")
    codes, pos, cls = inputs()
    code_ref, _ = official_logits(ref, codes, pos, cls)
    with torch.no_grad():
        assert (model(codes, pos, cond=cls).code_logits - code_ref).abs().max() <= 1e-4


class Hyper:  # stands in for the pickled objects (OmegaConf, AttributeDict) Lightning stores
    def __init__(self):
        self.lr = 1e-3


@pytest.mark.integration
def test_cli_refuses_pickled_objects_without_trust(tmp_path):
    ref = official()
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ref.state_dict(), "hyper_parameters": Hyper()}, ckpt)
    r = run_cli("official-stackformer", str(ckpt), str(tmp_path / "out"), *cli_flags())
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs trust" in lines[0] and "--trust-pickle" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
    # with trust it loads (the pickled class is importable from the repository root)
    r = run_cli("official-stackformer", str(ckpt), str(tmp_path / "out"), "--trust-pickle", *cli_flags())
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.integration
def test_cli_missing_file_is_one_line(tmp_path):
    r = run_cli("official-stackformer", str(tmp_path / "none.ckpt"), str(tmp_path / "o"), *cli_flags())
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such checkpoint" in r.stderr
