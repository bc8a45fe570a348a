"""The loader continued on another number of ranks (workers, batch size): every sample of the
epoch is delivered exactly once across the change (and across a second change mid-way), all new
ranks hand out equally many batches, and the next epoch is the one a fresh run of the new world has."""
from __future__ import annotations

import pytest

from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.partition import cut, epoch_pieces, left_after, pieces_rows
from mqscale.data.synthetic import token_set

COUNTS = [37, 50, 23, 41, 30]   # 181 sequences in 5 uneven shards
TOTAL = sum(COUNTS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("reshard"))
    token_set(base, COUNTS)
    return base


def cfg(**kw) -> DataConfig:
    base = dict(batch_size=4, num_workers=0, shuffle_buffer=10, seed=3)
    base.update(kw)
    return DataConfig(**base)


def ids(batch) -> list[int]:
    return batch["sample_id"][batch["mask"]].tolist()


def run(loaders: list[StreamingLoader], steps: int | None) -> list[int]:
    """``steps`` batches from every rank, in step (None: to the end of the epoch); the ids given."""
    its = [iter(x) for x in loaders]
    out, n = [], 0
    while steps is None or n < steps:
        got = [next(it, None) for it in its]
        if all(g is None for g in got):
            break
        assert all(g is not None for g in got), "ranks ran out at different batches"
        out += [i for g in got for i in ids(g)]
        n += 1
    for it in its:
        it.close()
    return out


def ranks(shards: str, world: int, **kw) -> list[StreamingLoader]:
    return [StreamingLoader(shards, cfg(**kw), rank=r, world=world) for r in range(world)]


def moved(old: list[StreamingLoader], shards: str, world: int, **kw) -> list[StreamingLoader]:
    states = [x.state_dict() for x in old]
    new = ranks(shards, world, **kw)
    for x in new:
        x.adopt(states)
    return new


def test_pieces_cover_the_rest_of_an_epoch_exactly():
    pieces = epoch_pieces(TOTAL, 2, 2)
    assert pieces_rows(pieces) == TOTAL and [p[0] for p in pieces] == [0, 1, 2, 3]
    left = left_after(pieces, 2, 2, 4, 5)           # 5 batches a rank: slots 0, 2 gave 3, slots 1, 3 gave 2
    assert left == [(0, 12, 45), (1, 8, 45), (2, 12, 45), (3, 8, 46)]   # slots of 45, 45, 45, 46
    assert pieces_rows(left) == TOTAL - 2 * (3 + 2) * 4
    assert cut(left, 30, 40) == [(0, 42, 45), (1, 8, 15)]
    assert left_after(left, 3, 1, 5, 0) == left     # nothing given yet: all of it


@pytest.mark.parametrize("old,new", [(dict(world=2), dict(world=1)), (dict(world=1), dict(world=2)),
                                     (dict(world=2, num_workers=2), dict(world=3, batch_size=5)),
                                     (dict(world=3, batch_size=3), dict(world=2, batch_size=6))],
                         ids=["2to1", "1to2", "2x2w-to-3-b5", "3-b3-to-2-b6"])
def test_every_sample_once_across_a_change_then_a_fresh_epoch(shards, old, new):
    ow, nw = old.pop("world"), new.pop("world")
    first = ranks(shards, ow, **old)
    seen = run(first, 7)
    second = moved(first, shards, nw, **new)
    counts = {x.batches_per_epoch for x in second}
    assert len(counts) == 1                                        # all new ranks equally long
    seen += run(second, None)
    assert sorted(seen) == list(range(TOTAL))                      # exactly once, nothing lost
    assert all(x.epoch == 1 and x.carry is None for x in second)
    # the next epoch is what a fresh run of the new world delivers in its epoch 1
    fresh = ranks(shards, nw, **new)
    for x in fresh:
        x.set_epoch(1)
    assert run(second, None) == run(fresh, None)


def test_a_second_change_in_the_middle_of_the_rest(shards):
    a = ranks(shards, 2, batch_size=4)
    seen = run(a, 6)
    b = moved(a, shards, 3, batch_size=3)
    seen += run(b, 4)
    assert b[0].carry is not None
    state = b[1].state_dict()
    c = moved(b, shards, 1, batch_size=8)
    seen += run(c, None)
    assert sorted(seen) == list(range(TOTAL))
    # the same world resumes a rest exactly, like any epoch
    again = StreamingLoader(shards, cfg(batch_size=3), rank=1, world=3)
    again.load_state_dict(state)
    assert again.carry == b[1].carry and again.batches == state["batches"]


def test_states_of_ranks_out_of_step_or_other_data_are_refused(shards):
    a = ranks(shards, 2)
    run(a, 2)
    states = [x.state_dict() for x in a]
    new = StreamingLoader(shards, cfg(), rank=0, world=1)
    with pytest.raises(ValueError, match="every rank's state"):
        new.adopt(states[:1])
    with pytest.raises(ValueError, match="differ in batches"):
        new.adopt([states[0], {**states[1], "batches": 3}])
    with pytest.raises(ValueError, match="seed"):
        StreamingLoader(shards, cfg(seed=4), rank=0, world=1).adopt(states)


def test_a_change_at_the_end_of_an_epoch_starts_the_next(shards):
    a = ranks(shards, 2)
    run(a, None)                  # the whole epoch, the generators not yet past its end
    states = [x.state_dict() for x in a]
    assert states[0]["epoch"] in (0, 1)
    b = moved(a, shards, 3)
    assert all(x.epoch == 1 and x.carry is None and x.batches == 0 for x in b)


def test_counters_carry_over_once(shards):
    a = ranks(shards, 2)
    run(a, 5)
    b = moved(a, shards, 3)
    assert b[0].stats()["samples"] == sum(x.stats()["samples"] for x in a)
    assert b[1].stats()["samples"] == b[2].stats()["samples"] == 0


def test_resampled_mode_continues_each_stream_at_the_same_row(shards):
    a = ranks(shards, 2, mode="resampled")
    run(a, 6)
    b = moved(a, shards, 1, mode="resampled", batch_size=8)
    assert b[0].batches == 3 and b[0].carry is None
    assert len(run(b, 2)) > 0
