"""mqscale.plan: counts match a real model, model-state memory matches DeepSpeed's estimators."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from mqscale.models.stackformer.model import Stackformer
from mqscale.train.config import load_train_config
from mqscale.train.plan import activation_bytes, largest_layer_params, model_state_bytes, plan

ROOT = Path(__file__).resolve().parents[2]
SIZES = ["debug", "307m", "607m", "1.4b", "3b", "7b"]
CLUSTERS = [(1, 1), (8, 1), (8, 4), (8, 16)]  # (gpus per node, nodes)


def counted(size: str) -> tuple[int, int, object]:
    """Parameters and the largest single module of the real model, built without memory."""
    cfg = load_train_config(f"configs/stackformer/{size}.yaml")
    with torch.device("meta"):
        model = Stackformer(cfg.model)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return sum(p.numel() for p in model.parameters()), largest, cfg


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_model_states_agree_with_deepspeed_estimators(size):
    total, largest, cfg = counted(size)
    assert largest_layer_params(cfg.model) == largest
    for gpus, nodes in CLUSTERS:
        world = gpus * nodes
        ours = {
            (2, "none"): model_state_bytes(total, largest, 2, "none", world),
            (2, "optimizer"): model_state_bytes(total, largest, 2, "optimizer", world),
            (3, "none"): model_state_bytes(total, largest, 3, "none", world),
            (3, "optimizer"): model_state_bytes(total, largest, 3, "optimizer", world),
            (3, "optimizer+params"): model_state_bytes(total, largest, 3, "optimizer+params", world),
        }
        theirs = {
            (2, "none"): estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)[1],
            (2, "optimizer"): estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True)[1],
            (3, "none"): estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False)[1],
            (3, "optimizer"): estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True,
                                                                    cpu_offload_params=False)[1],
            (3, "optimizer+params"): estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes)[1],
        }
        for key, want in theirs.items():
            assert abs(ours[key] - want) <= 0.10 * want, (size, gpus, nodes, key, ours[key], want)


def test_partitioning_shrinks_states_and_checkpointing_shrinks_activations():
    _, _, cfg = counted("3b")
    p = plan(cfg, 8, 80.0)
    by = {(r["zero"], r["offload"], r["activation_checkpointing"]): r for r in p["setups"]}
    states = [by[(z, "none", False)]["model_states_gb"] for z in range(4)]
    assert states == sorted(states, reverse=True) and states[0] > 4 * states[3]
    assert by[(3, "none", True)]["activations_gb"] < by[(3, "none", False)]["activations_gb"] / 5
    # ZeRO-0 for 3B: 20 bytes per parameter
    assert states[0] == pytest.approx(20 * p["params"] / 2 ** 30, rel=1e-3)


def test_smallest_fit_moves_up_the_ladder_as_memory_shrinks():
    _, _, cfg = counted("7b")
    assert plan(cfg, 8, 80.0)["smallest_fit"] == "ZeRO-1"
    assert plan(cfg, 8, 48.0)["smallest_fit"] == "ZeRO-2"
    assert plan(cfg, 8, 40.0)["smallest_fit"] == "ZeRO-3"
    assert plan(cfg, 1, 80.0)["smallest_fit"].startswith("ZeRO-2 + offload")
    assert plan(cfg, 1, 4.0)["smallest_fit"] is None


def test_activation_memory_scales_with_micro_batch():
    _, _, cfg = counted("307m")
    a = activation_bytes(cfg, False)
    cfg.data.batch_size *= 2
    assert activation_bytes(cfg, False) == pytest.approx(2 * a)


def test_throughput_and_epoch_time_follow_from_flops():
    _, _, cfg = counted("307m")
    p = plan(cfg, 8, 80.0, mfu=0.5, peak_tflops=1000.0, dataset_images=1000)
    assert p["tokens_per_s"] == pytest.approx(0.5 * 1000e12 * 8 / p["train_flops_per_token"])
    assert p["days_per_epoch"] == pytest.approx(1000 * 256 / p["tokens_per_s"] / 86400)


@pytest.mark.integration
def test_cli_json_and_table_and_bad_flags():
    run = lambda *a: subprocess.run([sys.executable, "-m", "mqscale.plan", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("--config", "configs/stackformer/1.4b.yaml", "--gpus", "8", "--gpu-mem-gb", "80", "--nodes", "2",
            "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["world"] == 16 and body["smallest_fit"] and len(body["setups"]) == 14
    t = run("--config", "configs/stackformer/1.4b.yaml", "--gpus", "8")
    assert t.returncode == 0 and "smallest setup that fits:" in t.stdout and "tokens/s" in t.stdout
    bad = run("--config", "configs/stackformer/1.4b.yaml", "--gpu", "TPU")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--gpu TPU" in bad.stderr
    bad = run("--config", "configs/stackformer/1.4b.yaml", "model.n_head=7")
    assert bad.returncode == 2 and "model.n_head" in bad.stderr and "Traceback" not in bad.stderr
