"""Shared fixtures: tiny configs and random raster-ordered sequences."""
from __future__ import annotations

import pytest
import torch

from mqscale.config import load_config

DEBUG = "configs/stackformer/debug.yaml"


def model_cfg(*overrides: str):
    extra = ["train.p_uncond=0"] if "model.cond=none" in overrides else []  # no condition to drop
    return load_config(DEBUG, list(overrides) + extra).model


def raster_batch(cfg, batch: int, L: int | None = None, seed: int = 0):
    """Random codes, ascending positions and a condition for ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    L = L or cfg.seq_len
    positions = torch.sort(torch.rand(batch, cfg.n_positions, generator=g).argsort(dim=-1)[:, :L],
                           dim=-1).values
    codes = torch.randint(0, cfg.codebook_size, (batch, L), generator=g)
    if cfg.cond == "class":
        cond = torch.randint(0, cfg.n_classes, (batch,), generator=g)
    elif cfg.cond == "text":
        cond = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    else:
        cond = None
    return codes, positions, cond


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on loopback (moto's ThreadedMotoServer), as s3fs's own test suite uses."""
    from tests.loopback_s3 import loopback_s3
    with loopback_s3("mqscale-test") as opts:
        yield opts
