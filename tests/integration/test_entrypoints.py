"""Every stage has an entry point with --help; the main job runs end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.training import events, losses

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("module", ["data_tools.shard_images", "data_tools.make_shapes",
                                    "data_tools.inspect", "data_tools.verify", "mqscale.plan",
                                    "mqscale.train_tokenizer", "mqscale.visualize_masks", "mqscale.tokenize",
                                    "mqscale.train", "mqscale.export", "mqscale.sample", "mqscale.evaluate",
                                    "mqscale.checkpoint"])
def test_built_tools_have_help(module):
    r = run("-m", module, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def test_convert_help_lists_the_official_converter():
    r = run("-m", "mqscale.convert", "--help")
    assert r.returncode == 0 and "official-stackformer" in r.stdout


# Framework chatter the console must not show (issue: 244 PlacementGroupCleaner lines, a
# PreemptionWatcher error line, torch.distributed FutureWarnings, Ray's per-report metric dicts)
NOISE = ("PlacementGroupCleaner", "Failed to query Ray Train Controller actor state", "PreemptionWatcher",
         "core_worker.cc", "FutureWarning", "all_gather_into_tensor", "Reporting training result",
         "Failed to send resource request", "Token authentication is enabled", "shm_comm_op built successfully")


def test_main_job_builds_its_data_then_trains_judges_and_reports(tmp_path):
    """`python -m mqscale.train` with no --config (what `make demo` runs), shrunk to test size: every
    stage runs, the quality numbers are printed and logged, and the console carries no noise."""
    w = tmp_path / "main"
    paths = [f"checkpoint.dir={w}", f"data.train_url={w}/tokens", f"logging.tokenizer={w}/tokenizer",
             f"logging.judge={w}/judge", "logging.judge_min_accuracy=0.01"]   # a 1-epoch judge: weak on purpose
    r = run("-m", "mqscale.train", "--demo-images", "300", "--demo-heldout", "60", "--demo-judge-epochs", "1",
            "--demo-tokenizer-steps", "4", "--demo-samples-per-class", "2", *paths,
            "train.max_steps=20", "logging.log_every=5", "logging.image_every=10", "logging.judge_samples=20",
            "checkpoint.every_steps=10")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout + r.stderr
    noisy = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert noisy == [], noisy[:5]
    assert "verify: OK, 300 decoded, 0 bad" in out and "verify: OK, 60 decoded, 0 bad" in out
    assert "[judge] trained on 300 images" in out and "[tokenizer] trained 4 steps under Ray Train" in out
    assert (w / "masks.png").is_file() and "kept cells covering objects:" in out
    assert "[tokenizer] held-out reconstructions: judged correct" in out
    assert "images in: 300, sequences out: 300" in out
    loss = losses(out)
    assert len(loss) == 4 and loss[-1] < loss[0]
    assert out.count("quality of 20 samples: conditional accuracy") == 2        # steps 10 and 20
    assert "[quality] 20 samples (guidance" in out and (w / "samples.png").is_file()
    run_dir = w / "stackformer-demo"
    assert f"samples: {run_dir}/samples/step_000000020.png" in r.stdout
    assert "checkpoints: checkpoint_000000020, checkpoint_000000010" in r.stdout
    assert f"tensorboard: tensorboard --logdir {run_dir}/tb" in r.stdout
    assert "[main] wall time per stage: data" in r.stdout
    ea = events(run_dir / "tb")
    assert [e.step for e in ea.Scalars("quality/cond_acc")] == [10, 20] and len(ea.Scalars("quality/fd_judge")) == 2
    assert all(0 <= e.value <= 1 for e in ea.Scalars("quality/cond_acc"))
    assert len(ea.Scalars("quality/final_cond_acc")) == 1 and len(ea.Scalars("quality/final_fd_judge")) == 1
    # a rerun finds the data and goes straight to training (and resumes: nothing left to do)
    again = run("-m", "mqscale.train", *paths, "train.max_steps=20", "--demo-samples-per-class", "2")
    assert again.returncode == 0 and "straight to training" in again.stdout, again.stderr[-2000:]


def test_main_job_config_error_is_one_line():
    r = run("-m", "mqscale.train", "model.n_head=3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.n_head" in r.stderr and "Traceback" not in r.stderr
