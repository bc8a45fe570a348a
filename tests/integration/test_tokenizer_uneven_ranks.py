"""The EMA codebook under data parallelism when ranks hold different numbers of real images.

Two real gloo ranks (torch.multiprocessing spawn). A rank whose batch is all padding must make the
same collectives as the others (before the fix it skipped them and gloo aborted), and padding rows
must move nothing: the synced codebook equals a single process's codebook fed the valid rows only.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mqscale.core.dist import DistStatSync
from mqscale.models.mqvae.quantizer import EMAQuantizer

pytestmark = pytest.mark.integration

K, D = 16, 4


def data():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, D, generator=g), torch.randn(6, D, generator=g)
    junk = 100.0 + 100.0 * torch.randn(8, D, generator=g)   # padding rows: far from every real vector
    return a, b, junk


def quantizer(restart: bool) -> EMAQuantizer:
    torch.manual_seed(0)                                     # same initial codebook on every rank
    return EMAQuantizer(K, D, restart_unused=restart).train()


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        a, b, junk = data()
        ones, zeros = torch.ones(8), torch.zeros(8)

        # 1. no restarts: the synced EMA equals one process fed only the valid rows
        q = quantizer(restart=False)
        q.sync = DistStatSync()
        # step 1: rank 0 holds a, rank 1's batch is all padding
        q(a if rank == 0 else junk, weight=ones if rank == 0 else zeros)
        # step 2: rank 0 holds b[:3] plus two padding rows, rank 1 holds b[3:]
        x2 = torch.cat([b[:3], junk[:2]]) if rank == 0 else b[3:]
        w2 = torch.tensor([1.0, 1, 1, 0, 0]) if rank == 0 else torch.ones(3)
        out = q(x2, weight=w2)
        ref = quantizer(restart=False)
        ref(a)
        ref(b)
        assert torch.allclose(q.embed, ref.embed, atol=1e-6)
        assert torch.allclose(q.cluster_size, ref.cluster_size, atol=1e-6)
        # the commitment loss counts the valid rows only
        valid = x2[w2 > 0]
        expect = q.beta * (valid - out.quantized.detach()[w2 > 0]).pow(2).mean()
        assert torch.allclose(out.commit_loss, expect, atol=1e-6)

        # 2. restarts: every rank restarts the same codes to the same real vectors
        q = quantizer(restart=True)
        q.sync = DistStatSync()
        # step 1: the first rank (the restart source) holds only padding: the dead codes wait
        r1 = q(junk if rank == 0 else a, weight=zeros if rank == 0 else ones).restarts
        assert isinstance(r1, torch.Tensor)      # a count kept on the device: no sync per step
        assert [r.item() for r in gathered(r1.view(1))] == [0, 0]
        e1 = gathered(q.embed.clone())
        assert torch.equal(e1[0], e1[1])
        # step 2: rank 0 holds b, rank 1 only padding: restarts come from b, never from padding
        r2 = q(b if rank == 0 else junk, weight=torch.ones(6) if rank == 0 else zeros).restarts
        assert r2 > 0 and [r.item() for r in gathered(r2.view(1))] == [r2.item()] * 2
        e2 = gathered(q.embed.clone())
        assert torch.equal(e2[0], e2[1])
        restarted = q.embed_sum[(q.cluster_size == 1.0)]
        assert restarted.shape[0] == r2
        assert torch.cdist(restarted, b).min(dim=1).values.max() < 0.05

        # 3. no rank holds a valid row: nothing moves, nothing decays, still in step
        before = (q.embed.clone(), q.cluster_size.clone())
        assert q(junk, weight=zeros).restarts == 0
        assert torch.equal(q.embed, before[0]) and torch.equal(q.cluster_size, before[1])

        # the ranks are still in step: one more collective completes on both
        t = torch.full((1000,), float(rank + 1))
        dist.all_reduce(t)
        assert torch.all(t == 3.0)
    finally:
        dist.destroy_process_group()


def test_padding_only_rank_keeps_collectives_in_step_and_weighs_nothing(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
