"""Distributed Stackformer training: real Ray, real DeepSpeed (CPU, gloo, bf16), real S3 API."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.make_shapes import write_shapes
from mqscale.convert.export import load_exported, save_exported
from mqscale.models.mqvae import MQVAE
from mqscale.tokenize import main as tokenize_main
from mqscale.tokenizer_config import load_tokenizer_config
from mqscale.train.checkpoint import MARKER, CheckpointStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    write_shapes(str(d / "shapes"), 240, resolution=32, shard_size=60, progress=False)
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml")
    torch.manual_seed(0)
    save_exported(MQVAE(cfg.model).eval(), cfg, d / "tokenizer")
    assert tokenize_main(["--tokenizer", str(d / "tokenizer"), "--input", str(d / "shapes"), "--output",
                          str(d / "tokens"), "--workers", "0", "--no-progress"]) == 0
    return d


def train(demo, storage, *overrides, env=None, launcher=None, timeout=600):
    args = [sys.executable, "-m", "mqscale.train", "--config", "configs/demo.yaml",
            f"data.train_url={demo / 'tokens'}", f"logging.tokenizer={demo / 'tokenizer'}",
            f"checkpoint.dir={storage}", "logging.log_every=2", "data.batch_size=8", *overrides]
    if launcher:
        args = launcher + ["mqscale.train"] + args[3:] + ["--launcher", "deepspeed"]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def losses(out: str) -> list[float]:
    return [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if " loss " in line and "step " in line]


def test_zero2_two_workers_learn_log_checkpoint_export_and_continue(demo_data, tmp_path):
    r = train(demo_data, tmp_path, "train.max_steps=12", "checkpoint.every_steps=6", "logging.sample_every=6")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    ls = losses(out)
    assert ls and ls[-1] < ls[0]
    run = tmp_path / "stackformer-demo"
    found = CheckpointStore(str(run)).candidates()
    assert [f.step for f in found] == [12, 6] and all(f.marker["world"] == 2 for f in found)
    assert (run / "samples" / "step_000000012.png").is_file()
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    for tag in ("loss/total", "loss/code", "loss/position", "lr", "grad_norm", "perf/tokens_per_s",
                "perf/sequences_per_s", "perf/data_wait_share", "perf/step_time_s", "memory_gb", "data/padding"):
        assert tag in ea.Tags()["scalars"], tag
    assert "samples/class_rows" in ea.Tags()["images"]
    # export -> a fresh process loads and samples
    e = subprocess.run([sys.executable, "-m", "mqscale.export", str(run), str(tmp_path / "exp")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    code = ("import torch; from mqscale.convert.export import load_exported; from mqscale.sampling import sample;"
            f"m, c = load_exported('{tmp_path / 'exp'}'); codes, pos = sample(m, torch.arange(4));"
            "assert (pos.diff(dim=1) > 0).all(); print('sampled', tuple(codes.shape))")
    s = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and "sampled (4, 16)" in s.stdout, s.stderr
    # relaunch with more steps continues from step 12
    again = train(demo_data, tmp_path, "train.max_steps=14", "checkpoint.every_steps=6")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "resumed from" in out and "at step 12" in out
    assert [f.step for f in CheckpointStore(str(run)).candidates()][:2] == [14, 12]


def test_zero3_two_workers_learn(demo_data, tmp_path):
    r = train(demo_data, tmp_path, "train.max_steps=10", "deepspeed.zero_stage=3", "logging.tokenizer=")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    ls = losses(out)
    assert ls and ls[-1] < ls[0]
    e = subprocess.run([sys.executable, "-m", "mqscale.export", str(tmp_path / "stackformer-demo"),
                        str(tmp_path / "exp")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    m, _ = load_exported(tmp_path / "exp")
    assert m.cfg.grid == 8


def test_killed_worker_resumes_exactly(demo_data, tmp_path):
    common = ["train.max_steps=10", "checkpoint.every_steps=4", "logging.tokenizer=", "ray.max_failures=1"]
    clean = train(demo_data, tmp_path / "clean", *common)
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-3000:]
    flag = tmp_path / "killed.flag"
    killed = train(demo_data, tmp_path / "killed", *common, env={"MQSCALE_FAULT_EXIT": f"6:1:{flag}"})
    out = killed.stdout + killed.stderr
    assert killed.returncode == 0, out[-4000:]
    assert flag.exists() and "resumed from" in out and "at step 4" in out
    for d in ("clean", "killed"):
        subprocess.run([sys.executable, "-m", "mqscale.export", str(tmp_path / d / "stackformer-demo"),
                        str(tmp_path / d / "exp")], cwd=ROOT, check=True, capture_output=True, timeout=300)
    a, _ = load_exported(tmp_path / "clean" / "exp")
    b, _ = load_exported(tmp_path / "killed" / "exp")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max().item() <= 1e-6, k


def test_damaged_newest_checkpoint_falls_back(demo_data, tmp_path):
    r = train(demo_data, tmp_path, "train.max_steps=8", "checkpoint.every_steps=4", "logging.tokenizer=")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = tmp_path / "stackformer-demo"
    newest = run / "checkpoint_000000008"
    shard = next(p for p in newest.rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])                     # truncated
    damaged_marker = json.loads((newest / MARKER).read_text())
    again = train(demo_data, tmp_path, "train.max_steps=10", "checkpoint.every_steps=4", "logging.tokenizer=")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "damaged" in out and "at step 4" in out
    (run / "checkpoint_000000010" / MARKER).unlink()                 # marker missing: incomplete
    # 10 is incomplete now; the resumed run (4 -> 10) wrote step 8 afresh over the damaged one
    fresh = CheckpointStore(str(run)).latest_valid()
    assert fresh.step == 8 and fresh.marker["files"] != damaged_marker["files"]


def test_deepspeed_launcher_runs_the_same_loop(demo_data, tmp_path):
    ds = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--module"]
    r = train(demo_data, tmp_path, "train.max_steps=4", "logging.tokenizer=", launcher=ds)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    found = CheckpointStore(str(tmp_path / "stackformer-demo")).latest_valid()
    assert found is not None and found.step == 4 and found.marker["world"] == 2
    assert "step 4/4" in out


BAD = [
    (["train.global_batch=20"], "train.global_batch: 20 is not divisible"),
    (["model.codebook_size=512"], "model.codebook_size: 512 does not match"),
    (["model.grid=16", "model.seq_len=16"], "model.grid: 16 does not match"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: 4 is out of range"),
    (["model.seq_len=8"], "model.seq_len: 8 is shorter"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_runs_fail_before_any_worker(demo_data, tmp_path, overrides, message):
    r = train(demo_data, tmp_path, *overrides, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "RayTrainWorker" not in r.stdout + r.stderr and not (tmp_path / "stackformer-demo").exists()


def test_missing_shards_and_foreign_tokenizer_fail_before_any_worker(demo_data, tmp_path):
    r = train(demo_data, tmp_path, f"data.train_url={tmp_path / 'nothing'}", timeout=120)
    assert r.returncode == 2 and "data.train_url:" in r.stderr and "no manifest" in r.stderr
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml")
    torch.manual_seed(5)
    save_exported(MQVAE(cfg.model).eval(), cfg, tmp_path / "other")
    r = train(demo_data, tmp_path, f"logging.tokenizer={tmp_path / 'other'}", timeout=120)
    assert r.returncode == 2 and "not the tokenizer that made the token shards" in r.stderr
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"gradient_clipping": 5.0}))
    r = train(demo_data, tmp_path, f"deepspeed.config_json={bad}", timeout=120)
    assert r.returncode == 2 and "conflicts with the run config on gradient_clipping" in r.stderr


def test_two_node_cluster_with_checkpoints_only_in_s3(demo_data, tmp_path, s3, capfd):
    """No shared filesystem: 2 simulated nodes (1 CPU each), storage on the loopback S3 server."""
    import ray
    from ray.cluster_utils import Cluster

    from mqscale.train.__main__ import main as train_main
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        so = json.dumps(s3)
        args = ["--config", "configs/demo.yaml", f"data.train_url={demo_data / 'tokens'}", "logging.tokenizer=",
                "checkpoint.dir=s3://mqscale-test/runs", f"checkpoint.storage_options={so}",
                "checkpoint.every_steps=3", "data.batch_size=8", "logging.log_every=3"]
        assert train_main(args + ["train.max_steps=6"]) == 0
        store = CheckpointStore("s3://mqscale-test/runs/stackformer-demo", s3)
        assert [f.step for f in store.candidates()] == [6, 3]
        assert store.latest_valid().step == 6
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        capfd.readouterr()
        assert train_main(args + ["train.max_steps=8"]) == 0
        assert store.latest_valid().step == 8
        import time
        time.sleep(2)  # worker logs reach the driver asynchronously
        logs = "".join(capfd.readouterr())
        assert "resumed from s3://mqscale-test/runs/stackformer-demo/checkpoint_000000006 at step 6" in logs
        body = store.latest_valid().marker
        assert body["world"] == 2 and any("zero_pp_rank_1_" in f for f in body["files"])
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_with_a_checkpoint(demo_data, tmp_path):
    nan = {"MQSCALE_FAULT_NAN": "grad:3:1,loss:5:1"}    # one NaN gradient, one NaN loss
    r = train(demo_data, tmp_path, "train.max_steps=8", "logging.tokenizer=", "logging.log_every=4", env=nan)
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
    m, _ = load_exported(tmp_path / "exp")
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # a streak: every micro-batch towards step 10 is NaN; more than 2 in a row stops after a checkpoint
    r = train(demo_data, tmp_path, "train.max_steps=12", "train.max_nonfinite=2", "logging.tokenizer=",
              env={"MQSCALE_FAULT_NAN": "loss:10:1000"})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("training failed:") and "3 non-finite losses or gradients in a row at step 10" in last, \
        r.stderr[-2000:]
    assert CheckpointStore(str(run)).latest_valid().step == 9
