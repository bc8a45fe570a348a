"""A process that dies in the middle of writing a checkpoint: the next start resumes from the
previous complete checkpoint, ignores the partial one, and deletes it at its first save."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mqscale.core.checkpoint import MARKER, CheckpointStore
from tests.helpers.training import ROOT, train

pytestmark = pytest.mark.integration

DS = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--module"]


def test_a_save_killed_between_files_is_ignored_then_cleaned_up(fault_data, tmp_path):
    flag = tmp_path / "save.flag"
    run = tmp_path / "stackformer-demo"
    # the deepspeed launcher path: each rank uploads its own files, rank 0 the marker last
    r = train(fault_data, tmp_path, "train.max_steps=8", "checkpoint.every_steps=3", "logging.tokenizer=",
              launcher=DS, env={"MQSCALE_FAULT_SAVE": f"6:1:{flag}"})
    assert r.returncode != 0 and flag.exists(), (r.stdout + r.stderr)[-3000:]
    partial = run / "checkpoint_000000006"
    assert partial.is_dir() and not (partial / MARKER).exists()
    assert any(partial.rglob("*zero_pp_rank_1_*"))                  # rank 1 had begun: one file up
    assert len([p for p in partial.rglob("*") if p.is_file()]) < len(
        [p for p in (run / "checkpoint_000000003").rglob("*") if p.is_file()])
    v = subprocess.run([sys.executable, "-m", "mqscale.checkpoint", "verify", str(run)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "checkpoint_000000006: no mqscale_complete.json: incomplete" in v.stdout, v.stdout
    store = CheckpointStore(str(run))
    assert store.latest_valid().step == 3 and sorted(store.scan()[1]) == ["checkpoint_000000006"]
    # the relaunch saves at 4 and 8: nothing ever overwrites the partial step-6 directory
    again = train(fault_data, tmp_path, "train.max_steps=8", "checkpoint.every_steps=4", "logging.tokenizer=",
                  launcher=DS)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoint_000000003'} at step 3" in out
    assert "removed checkpoint_000000006: a partial checkpoint" in out
    assert not partial.exists()
    assert [f.step for f in store.candidates()] == [8, 4, 3] and sorted(store.scan()[1]) == []
