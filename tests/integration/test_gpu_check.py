"""bench/gpu_check.sh on a machine without a GPU: its syntax, its CPU fallback (one JSON saying
so, listing the tests a GPU run would run) and the `gpu` marker's selection (deselected by
default, selected by -m gpu)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
GPU_TESTS = {"test_bf16_cuda_training_step_lowers_the_loss", "test_sdpa_takes_the_flash_or_cudnn_kernel",
             "test_nccl_process_group_of_one_rank", "test_loader_pins_host_memory",
             "test_cuda_rng_state_survives_a_checkpoint_round_trip", "test_zero_trains_on_the_gpu[2]",
             "test_zero_trains_on_the_gpu[3]"}


def collect(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "tests/gpu", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.stdout


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_tests_are_deselected_by_default_and_selected_by_the_marker():
    default, chosen = collect(), collect("-m", "gpu")
    assert "::" not in default and "7 deselected" in default, default[-500:]
    assert {line.split("::")[-1] for line in chosen.splitlines() if "::" in line} == GPU_TESTS


def test_without_a_gpu_the_script_writes_one_json_saying_so(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, also on one
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["gpu"] is None and report["parts"]["tests"]["rc"] == 0 and "no CUDA device" in report["note"]
    assert {t.split("::")[-1] for t in report["gpu_tests_selected"]} == GPU_TESTS
    assert not list(tmp_path.glob("*.partial"))
