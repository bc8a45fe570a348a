"""A training job over poisoned token shards: 1% corrupt rows, rows with out-of-range codes, one
truncated shard and a pickle member whose payload would create a file if it were ever unpickled.
Training finishes; the data counters it logs equal what was planted; nothing was executed."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mqscale.data.synthetic import token_set
from mqscale.data.tokens import TokenMeta, npy_bytes, npy_load
from tests.helpers.shards import Bomb, add_member, members_of, rows_before_cut
from tests.helpers.training import train

pytestmark = pytest.mark.integration

META = TokenMeta(grid=8, codebook_size=256, seq_len=32, cond="class", n_classes=10, tokenizer_sha256="")
SHARDS, ROWS, CHUNK = 5, 100, 20           # 500 sequences; 2 ranks x 8 = 16 a step: 32 steps an epoch


def poison(base: Path, marker: Path) -> dict[str, int]:
    """Plant the faults; returns what the loader must count."""
    token_set(str(base), [ROWS] * SHARDS, meta=META, chunk=CHUNK)
    g = np.random.default_rng(1)
    corrupt = out_of_range = 0
    for i in range(SHARDS - 1):                       # the last shard gets truncated instead
        shard = base / f"tokens-{i:06d}.tar"
        members = []
        for name, data in members_of(shard):
            if name.endswith(".codes.npy") and name.startswith("000002."):
                codes = npy_load(data).copy()
                codes[g.integers(0, CHUNK)] = META.codebook_size + 7          # a row of out-of-range codes
                out_of_range += 1
                data = npy_bytes(codes.astype(np.int16))
            if name.endswith(".posbits.npy") and name.startswith("000003."):
                bits = npy_load(data).copy()
                rows = g.choice(CHUNK, 2 if i == 3 else 1, replace=False)   # 5 = 1% of 500
                bits[rows] = 0                                                 # no kept cell: a row of length 0
                corrupt += len(rows)
                data = npy_bytes(bits)
            members.append((name, data))
            if i == 1 and name.endswith("000000.codes.npy"):
                members.append(("000000.evil.pkl", pickle.dumps(Bomb(str(marker)))))
        with tarfile.open(shard, "w") as tf:
            for name, data in members:
                add_member(tf, name, data)
    last = base / f"tokens-{SHARDS - 1:06d}.tar"
    data = last.read_bytes()
    cut = len(data) * 3 // 5
    last.write_bytes(data[:cut])
    return {"invalid_samples": corrupt + out_of_range, "refused_members": 1, "corrupt_shards": 1,
            "missing_samples": ROWS - rows_before_cut(data, cut, CHUNK), "rows": SHARDS * ROWS,
            "corrupt_rows": corrupt, "out_of_range_rows": out_of_range}


def test_training_over_poisoned_shards_counts_what_was_planted(fault_data, tmp_path):
    marker = tmp_path / "PWNED"
    planted = poison(tmp_path / "tokens", marker)
    assert planted["corrupt_rows"] == 1 * SHARDS * ROWS // 100           # 1% of the rows
    r = train(fault_data, tmp_path, f"data.train_url={tmp_path / 'tokens'}", "logging.tokenizer=",
              "train.max_steps=32", "logging.log_every=8", "checkpoint.every_steps=16")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert not marker.exists()                                           # nothing was unpickled
    ea = EventAccumulator(str(tmp_path / "stackformer-demo" / "tb"))
    ea.Reload()
    final = {k: ea.Scalars(f"data/{k}")[-1].value for k in ("invalid_samples", "refused_members", "corrupt_shards",
                                                           "missing_samples", "samples")}
    for k in ("invalid_samples", "refused_members", "corrupt_shards", "missing_samples"):
        assert final[k] == planted[k], (k, final, planted)
    lost = planted["invalid_samples"] + planted["missing_samples"]
    assert final["samples"] == planted["rows"] - lost                     # every other row was trained on
    assert "tokens-000004.tar" in out and "evil.pkl" in out              # named in the workers' logs
