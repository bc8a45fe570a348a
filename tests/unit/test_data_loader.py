"""Streaming loader: exactly once across ranks and workers, equal lengths, exact resume, order."""
from __future__ import annotations

import pytest
import torch

from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.synthetic import META, sequence, token_set

COUNTS = [37, 50, 23, 41, 30]   # 5 uneven shards, 181 sequences


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("tok5"))
    token_set(base, COUNTS)
    return base


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("tokbig"))
    token_set(base, [230, 170, 250, 190, 160])  # 1000 sequences
    return base


def cfg(**kw):
    base = dict(batch_size=4, num_workers=2, shuffle_buffer=10, seed=3, worker_start="spawn")
    base.update(kw)
    return DataConfig(**base)


def ids_of(batches):
    return [i for b in batches for i in b["sample_id"][b["mask"]].tolist()]


@pytest.mark.integration
def test_exactly_once_two_ranks_two_workers(five_shards):
    per_rank = []
    for rank in range(2):
        loader = StreamingLoader(five_shards, cfg(), rank=rank, world=2)
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch  # every rank the same count: nobody hangs
        assert all(b["codes"].shape == (4, META.seq_len) for b in batches)
        per_rank.append(ids_of(batches))
        assert loader.epoch == 1 and loader.stats()["samples"] == len(per_rank[-1])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not a & b
    assert a | b == set(range(sum(COUNTS)))
    assert len(per_rank[0]) + len(per_rank[1]) == sum(COUNTS)  # no duplicates within a rank either
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_rows_carry_their_own_data(five_shards):
    batch = next(iter(StreamingLoader(five_shards, cfg(num_workers=0))))
    for row in range(4):
        gid = int(batch["sample_id"][row])
        codes, pos, label = sequence(META, gid)
        assert batch["codes"][row].tolist() == codes.tolist()
        assert batch["positions"][row].tolist() == pos.tolist()
        assert int(batch["cond"][row]) == label


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.integration
def test_resume_after_40_batches_gives_the_same_next_8(big_set, rank):
    c = cfg(batch_size=8, shuffle_buffer=50)
    original = StreamingLoader(big_set, c, rank=rank, world=2)
    it = iter(original)
    for _ in range(40):
        next(it)
    state = original.state_dict()
    expected = [next(it) for _ in range(8)]
    it.close()
    fresh = StreamingLoader(big_set, c, rank=rank, world=2)
    fresh.load_state_dict(state)
    got = []
    for b in fresh:
        got.append(b)
        if len(got) == 8:
            break
    for e, g in zip(expected, got):
        for k in ("codes", "positions", "cond", "mask", "sample_id"):
            assert torch.equal(e[k], g[k]), k
    assert fresh.state_dict()["batches"] == 48


@pytest.mark.integration
def test_resume_with_an_odd_count_rotates_workers(big_set):
    c = cfg(batch_size=8, shuffle_buffer=50, num_workers=2)
    ref = [b["sample_id"] for b in StreamingLoader(big_set, c, rank=0, world=1)][:12]
    a = StreamingLoader(big_set, c)
    it = iter(a)
    for _ in range(7):
        next(it)
    it.close()
    b = StreamingLoader(big_set, c)
    b.load_state_dict(a.state_dict())
    got = [x["sample_id"] for _, x in zip(range(5), b)]
    for e, g in zip(ref[7:12], got):
        assert torch.equal(e, g)


def test_seed_and_epoch_decide_the_order(five_shards):
    one = lambda **kw: ids_of(StreamingLoader(five_shards, cfg(num_workers=0, **kw)))  # noqa: E731
    assert one() == one()
    assert one() != one(seed=4)
    loader = StreamingLoader(five_shards, cfg(num_workers=0))
    e0 = ids_of(loader)
    e1 = ids_of(loader)            # the loader moved on to epoch 1 by itself
    assert loader.epoch == 2
    assert sorted(e0) == sorted(e1) == list(range(sum(COUNTS)))
    assert e0 != e1


def test_no_shuffle_is_manifest_order(five_shards):
    ids = ids_of(StreamingLoader(five_shards, cfg(num_workers=0, shuffle=False)))
    assert ids == list(range(sum(COUNTS)))


def test_resampled_mode_is_endless_and_resumable(five_shards):
    c = cfg(num_workers=0, mode="resampled")
    a = StreamingLoader(five_shards, c)
    assert a.batches_per_epoch is None
    it = iter(a)
    first = [next(it)["sample_id"] for _ in range(120)]     # more than one pass over 181 rows
    assert len({i for t in first for i in t.tolist()}) > 100
    b = StreamingLoader(five_shards, c)
    it = iter(b)
    for _ in range(50):
        next(it)
    state = b.state_dict()
    c2 = StreamingLoader(five_shards, c)
    c2.load_state_dict(state)
    assert torch.equal(next(iter(c2))["sample_id"], first[50])


def test_state_from_another_setup_is_refused(five_shards):
    a = StreamingLoader(five_shards, cfg(num_workers=0))
    b = StreamingLoader(five_shards, cfg(num_workers=0, batch_size=5))
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())
