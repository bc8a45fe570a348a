"""A checkpoint saved by 2 workers resumed by 1, and the reverse: refused before any worker
starts, with one line saying why and what to do, never loaded silently wrong."""
from __future__ import annotations

import pytest

from tests.helpers.training import train

pytestmark = pytest.mark.integration

COMMON = ["train.max_steps=3", "logging.tokenizer="]


def refused(r, saved: int, now: int) -> str:
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    line = r.stderr.strip()
    assert "\n" not in line and f"saved by {saved} workers, this run has {now}" in line, line
    assert "resharding a checkpoint onto another number of workers is not supported" in line
    assert "RayTrainWorker" not in r.stdout + r.stderr
    return line


def test_two_workers_to_one_and_one_to_two_are_refused(fault_data, tmp_path):
    two = train(fault_data, tmp_path / "two", *COMMON)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    ckpt2 = tmp_path / "two" / "stackformer-demo" / "checkpoint_000000003"
    # the same run relaunched on 1 worker (its own newest checkpoint would be resumed)
    line = refused(train(fault_data, tmp_path / "two", "train.max_steps=5", "logging.tokenizer=",
                         "ray.num_workers=1"), 2, 1)
    assert str(ckpt2) in line and "relaunch with 2 workers" in line
    # a new 1-worker run seeded from it
    refused(train(fault_data, tmp_path / "one-from-two", *COMMON, "ray.num_workers=1", "--resume-from", str(ckpt2)),
            2, 1)
    # and the reverse
    one = train(fault_data, tmp_path / "one", *COMMON, "ray.num_workers=1")
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    ckpt1 = tmp_path / "one" / "stackformer-demo" / "checkpoint_000000003"
    refused(train(fault_data, tmp_path / "one", "train.max_steps=5", "logging.tokenizer="), 1, 2)
    refused(train(fault_data, tmp_path / "two-from-one", *COMMON, "--resume-from", str(ckpt1)), 1, 2)
    assert not (tmp_path / "one-from-two").exists() and not (tmp_path / "two-from-one").exists()
