"""Every stage has an entry point with --help; the main job runs end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_main_job_builds_its_data_then_trains_and_reports(tmp_path):
    """`python -m mqscale.train` with no --config (what `make demo` runs), shrunk to test size."""
    w = tmp_path / "main"
    paths = [f"checkpoint.dir={w}", f"data.train_url={w}/tokens", f"logging.tokenizer={w}/tokenizer"]
    r = run("-m", "mqscale.train", "--demo-images", "300", "--demo-tokenizer-steps", "4", *paths,
            "train.max_steps=20", "logging.log_every=5", "checkpoint.every_steps=10")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout + r.stderr
    assert "verify: OK, 300 decoded, 0 bad" in out and "[tokenizer] trained 4 steps under Ray Train" in out
    assert (w / "masks.png").is_file() and "kept cells covering objects:" in out
    assert "images in: 300, sequences out: 300" in out
    losses = [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if " loss " in line and "step " in line]
    assert len(losses) == 4 and losses[-1] < losses[0]
    run_dir = w / "stackformer-demo"
    assert f"samples: {run_dir}/samples/step_000000020.png" in r.stdout
    assert (run_dir / "samples" / "step_000000020.png").is_file()
    assert "checkpoints: checkpoint_000000020, checkpoint_000000010" in r.stdout
    assert f"tensorboard: tensorboard --logdir {run_dir}/tb" in r.stdout
    # a rerun finds the data and goes straight to training (and resumes: nothing left to do)
    again = run("-m", "mqscale.train", *paths, "train.max_steps=20")
    assert again.returncode == 0 and "straight to training" in again.stdout, again.stderr[-2000:]


def test_main_job_config_error_is_one_line():
    r = run("-m", "mqscale.train", "model.n_head=3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.n_head" in r.stderr and "Traceback" not in r.stderr
