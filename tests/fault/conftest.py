"""Fixtures of the fault suite: the demo token shards once per session, and helpers to run
training the way users do (a subprocess of ``python -m mqscale.train``)."""
from __future__ import annotations

import pytest
import torch

from data_tools.make_shapes import write_shapes
from mqscale.convert.export import save_exported
from mqscale.models.mqvae import MQVAE
from mqscale.tokenize import main as tokenize_main
from mqscale.tokenizer_config import load_tokenizer_config


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory):
    """240 shapes images (4 shards), a demo tokenizer and its token shards: 15 steps of 2 x 8 are
    exactly one epoch."""
    d = tmp_path_factory.mktemp("fault-data")
    write_shapes(str(d / "shapes"), 240, resolution=32, shard_size=60, progress=False)
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml")
    torch.manual_seed(0)
    save_exported(MQVAE(cfg.model).eval(), cfg, d / "tokenizer")
    assert tokenize_main(["--tokenizer", str(d / "tokenizer"), "--input", str(d / "shapes"), "--output",
                          str(d / "tokens"), "--workers", "0", "--no-progress"]) == 0
    return d
