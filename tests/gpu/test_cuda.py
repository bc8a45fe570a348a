"""What only a GPU can show: the bf16 CUDA step, the flash/cuDNN attention kernel, NCCL, pinned
memory, the CUDA RNG in checkpoints, ZeRO-2/3 on the device. Marked ``gpu``: deselected by
default (pyproject's addopts) like ``heavy``; ``bench/gpu_check.sh`` runs them on one GPU
(``pytest -m gpu tests/gpu``). Engine cases run one rank in a process of their own."""
from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.synthetic import token_set
from mqscale.models.stackformer.model import Stackformer
from mqscale.train.optim import param_groups
from tests.helpers.models import model_cfg, raster_batch
from tests.helpers.training import DEMO_META, client_state, in_one_rank, one_rank_run

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
CUDA = torch.device("cuda")


def test_bf16_cuda_training_step_lowers_the_loss():
    cfg = model_cfg("model.n_embd=256", "model.n_head=4")
    model = Stackformer(cfg).to(CUDA).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, fused=True)
    codes, pos, cond = (t.to(CUDA) for t in raster_batch(cfg, 16))
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(codes, pos, cond=cond).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_sdpa_takes_the_flash_or_cudnn_kernel():
    q, k, v = (torch.randn(4, 16, 256, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):  # raises if neither applies
        restricted = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        free = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # what the model's call picks
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events())
    assert any(s in names for s in ("flash", "cudnn", "fmha")), names[:2000]
    assert torch.allclose(restricted, free, atol=1e-2)


def test_nccl_process_group_of_one_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.full((4,), 3.0, device=CUDA)
        dist.all_reduce(x)
        assert dist.get_backend() == "nccl" and x.tolist() == [3.0] * 4
    finally:
        dist.destroy_process_group()


def test_loader_pins_host_memory(tmp_path):
    token_set(str(tmp_path / "tokens"), [32], meta=DEMO_META)
    loader = StreamingLoader(str(tmp_path / "tokens"), DataConfig(batch_size=8, num_workers=0))
    assert loader.pin_memory
    batch = next(iter(loader))
    assert batch["codes"].is_pinned() and batch["positions"].is_pinned()


def case_cuda_rng_round_trip(tmp: str) -> None:
    tmp = Path(tmp)
    t = one_rank_run(tmp, "rng", "train.max_steps=2", "checkpoint.every_steps=2")
    assert t.device.type == "cuda"
    t.fit()
    saved = client_state(tmp / "rng" / "checkpoint_000000002")["rng"][0]["cuda"]
    torch.cuda.manual_seed(12345)  # move the generator away from the saved state
    t2 = one_rank_run(tmp, "rng", "train.max_steps=4", "checkpoint.every_steps=2")
    assert t2.restored_from and torch.equal(torch.cuda.get_rng_state(), saved)


def case_zero_on_gpu(tmp: str, stage: int) -> None:
    t = one_rank_run(Path(tmp), f"z{stage}", f"deepspeed.zero_stage={stage}", "train.max_steps=4")
    assert t.engine.device.type == "cuda" and next(t.engine.module.parameters()).device.type == "cuda"
    out = t.fit()
    assert out["step"] == 4 and math.isfinite(out["loss/total"])


def test_cuda_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    in_one_rank(__name__, "case_cuda_rng_round_trip", str(tmp_path))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_on_the_gpu(tmp_path, stage):
    in_one_rank(__name__, "case_zero_on_gpu", str(tmp_path), stage)
