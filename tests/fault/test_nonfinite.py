"""Non-finite losses and gradients: a step that would apply one is skipped and counted; a streak
stops the run with a final checkpoint, as a clean stop (no Ray retry), with one line saying why."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mqscale.core.checkpoint import CheckpointStore
from mqscale.train.config import STACKFORMER
from tests.helpers.training import ROOT, train

pytestmark = pytest.mark.integration


def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_with_a_checkpoint(fault_data, tmp_path):
    nan = {"MQSCALE_FAULT_NAN": "grad:3:1,loss:5:1"}    # one NaN gradient, one NaN loss
    r = train(fault_data, tmp_path, "train.max_steps=8", "logging.tokenizer=", "logging.log_every=4", env=nan)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "non-finite grad at step 3" in out and "non-finite loss at step 5" in out
    run = tmp_path / "stackformer-demo"
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("skipped/nonfinite")] == [1.0, 2.0]
    assert [e.step for e in ea.Scalars("loss/total")] == [4, 8]       # 8 real updates despite the skips
    e = subprocess.run([sys.executable, "-m", "mqscale.export", str(run), str(tmp_path / "exp")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    m, _ = STACKFORMER.load(tmp_path / "exp")
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # a streak: every micro-batch towards step 10 is NaN; more than 2 in a row stops after a checkpoint.
    # Stopping is not a worker failure: with max_failures=1 Ray must not start the workers again.
    r = train(fault_data, tmp_path, "train.max_steps=12", "train.max_nonfinite=2", "logging.tokenizer=",
              "ray.max_failures=1", env={"MQSCALE_FAULT_NAN": "loss:10:1000"})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("training failed:") and "3 non-finite losses or gradients in a row at step 10" in last, \
        r.stderr[-2000:]
    assert out.count("resumed from") == 2, out[-4000:]               # one start of both ranks, no retry
    assert out.count("fault injection: non-finite loss at step 10") == 3
    assert CheckpointStore(str(run)).latest_valid().step == 9
