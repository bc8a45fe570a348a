"""Fixtures of the fault suite: the demo token shards once per session, and helpers to run
training the way users do (a subprocess of ``python -m mqscale.train``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools.make_shapes import write_shapes
from mqscale.convert.export import save_exported
from mqscale.models.mqvae import MQVAE
from mqscale.tokenize import main as tokenize_main
from mqscale.tokenizer_config import load_tokenizer_config


def build_fault_data(d: Path) -> Path:
    """240 shapes images (4 shards), a demo tokenizer and its token shards under ``d``: 15 steps
    of 2 ranks x 8 rows are exactly one epoch."""
    write_shapes(str(d / "shapes"), 240, resolution=32, shard_size=60, progress=False)
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml")
    torch.manual_seed(0)
    save_exported(MQVAE(cfg.model).eval(), cfg, d / "tokenizer")
    assert tokenize_main(["--tokenizer", str(d / "tokenizer"), "--input", str(d / "shapes"), "--output",
                          str(d / "tokens"), "--workers", "0", "--no-progress"]) == 0
    return d


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> Path:
    return build_fault_data(tmp_path_factory.mktemp("fault-data"))
