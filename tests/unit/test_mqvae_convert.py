"""Import of official MQ-VAE checkpoints: same kept cells, same codes, same decode (1e-4)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mqscale.convert.official_mqvae import load_mqvae
from mqscale.core.errors import ConversionError
from mqscale.tokenizer.config import TOKENIZER
from tests.helpers.official_mqvae import OfficialMQVAE

ROOT = Path(__file__).resolve().parents[2]

PARAMS = {  # the official stage-1 YAML's model.params, shrunk (same keys as mqvae_imagenet_f8_r30)
    "encoder_config": {"target": "modules.diffusionmodules.model.Encoder", "params": {
        "double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}},
    "decoder_config": {"target": "modules.masked_quantization.decoder.Decoder", "params": {
        "ch": 32, "in_ch": 32, "out_ch": 3, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "resolution": 32,
        "attn_resolutions": [8], "dropout": 0.0, "resamp_with_conv": True, "give_pre_end": False}},
    "masker_config": {"target": "modules.masked_quantization.masker_vanilla_refine.VanillaMasker", "params": {
        "topk_ratio": 0.3, "input_token_num": 64, "input_dim": 32, "patch_size": 4,
        "score_pred_net_mode": "2layer", "codebook_dim": 16}},
    "demasker_config": {"target": "modules.masked_quantization.demasker_vanilla.VanillaDemasker", "params": {
        "output_dim": 64, "codebook_dim": 16, "height_and_width": 8, "n_layer": 2, "mask_init_value": 0.02}},
    "vqconfig": {"target": "modules.vector_quantization.quantize2.VectorQuantize2", "params": {
        "codebook_size": 40, "codebook_dim": 16, "channel_last": False, "accept_image_fmap": False,
        "commitment_beta": 0.25, "decay": 0.99, "restart_unused_codes": True}},
    "lossconfig": {"target": "modules.losses.vqperceptual.DummyLoss"},
}


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    ref = OfficialMQVAE(PARAMS).eval()
    with torch.no_grad():  # a spread-out codebook so codes are not all alike
        ref.quantize.codebook.weight.normal_(0, 0.5)
    return ref


def images(n=3):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_keeps_same_cells_and_codes_and_decode_matches(official):
    from mqscale.convert.official import load_mqvae as public  # the name issue 4 promises
    assert public is load_mqvae
    ours = public(official.state_dict(), PARAMS)
    x = images()
    codes_ref, index_ref = official.encode(x)
    enc = ours.encode(x)
    assert enc.positions.shape == (3, int(0.3 * 64))
    for b in range(3):
        assert set(enc.positions[b].tolist()) == set(index_ref[b].tolist())
        by_pos = dict(zip(index_ref[b].tolist(), codes_ref[b].tolist()))
        assert enc.codes[b].tolist() == [by_pos[p] for p in enc.positions[b].tolist()]
    assert (enc.positions.diff(dim=1) > 0).all()
    ref_img = official.decode(codes_ref, index_ref)
    our_img = ours.decode(enc.codes, enc.positions)
    assert (ref_img - our_img).abs().max().item() <= 1e-4


@pytest.mark.integration
def test_lightning_checkpoint_and_yaml_through_the_cli(tmp_path, official):
    sd = {k: v for k, v in official.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)          # ignored
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "last.ckpt")
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump({"model": {"target": "x", "params": PARAMS}}))
    r = subprocess.run([sys.executable, "-m", "mqscale.convert", "official-mqvae", str(tmp_path / "last.ckpt"),
                        str(tmp_path / "stage1.yaml"), str(tmp_path / "tok")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    tok, cfg = TOKENIZER.load(tmp_path / "tok")
    assert cfg.model.grid == 8 and cfg.model.keep == 19
    x = images(2)
    codes_ref, index_ref = official.encode(x)
    assert (official.decode(codes_ref, index_ref) - tok.reconstruct(x)).abs().max().item() <= 1e-4


def test_mismatched_config_is_refused(official):
    bad = copy.deepcopy(PARAMS)
    bad["demasker_config"]["params"]["output_dim"] = 32
    with pytest.raises(ConversionError, match="demasker output_dim is 32"):
        load_mqvae(official.state_dict(), bad)
    sd = dict(official.state_dict())
    sd.pop("masker.pre_projection.weight")
    with pytest.raises(ConversionError, match="missing"):
        load_mqvae(sd, PARAMS)
