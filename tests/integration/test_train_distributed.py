"""Distributed Stackformer training: real Ray, real DeepSpeed (CPU, gloo, bf16), real S3 API."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mqscale.core.checkpoint import MARKER, CheckpointStore
from mqscale.models.mqvae.model import MQVAE
from mqscale.models.stackformer.counting import param_count
from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config
from mqscale.train.config import STACKFORMER, load_train_config
from tests.helpers.training import (
    ROOT,
    build_demo_data,
    client_state,
    events,
    hparams,
    in_one_rank,
    losses,
    one_rank_run,
    train,
)

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo"))


def test_zero2_two_workers_learn_log_checkpoint_export_and_continue(demo_data, tmp_path):
    r = train(demo_data, tmp_path, "train.max_steps=12", "checkpoint.every_steps=6", "logging.image_every=6",
              "logging.peak_tflops=0.5", "checkpoint.keep_last=2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    ls = losses(out)
    assert ls and ls[-1] < ls[0]
    run = tmp_path / "stackformer-demo"
    found = CheckpointStore(str(run)).candidates()
    assert [f.step for f in found] == [12, 6] and all(f.marker["world"] == 2 for f in found)
    # tokens seen are the run's, over both ranks (one rank alone sees at most 12 x 8 x L of them)
    L = load_train_config("configs/demo.yaml").model.seq_len
    assert client_state(Path(found[0].url))["tokens"] > 12 * 8 * L
    assert (run / "samples" / "step_000000012.png").is_file()
    ea = events(run / "tb")
    for tag in ("loss/total", "loss/code", "loss/position", "lr", "grad_norm", "perf/tokens_per_s",
                "perf/sequences_per_s", "perf/data_wait_share", "perf/step_time_s", "memory_gb", "data/padding",
                "perf/mfu"):
        assert tag in ea.Tags()["scalars"], tag
    mfu = ea.Scalars("perf/mfu")[-1].value       # model TFLOP/s per worker over the 0.5 given as peak
    tflops = ea.Scalars("perf/model_tflops_per_worker")[-1].value
    assert mfu == pytest.approx(tflops / 0.5) and mfu > 0
    assert [e.step for e in ea.Images("samples/class_rows")] == [6, 12]
    hp = hparams(ea)
    assert hp["params"] == param_count(load_train_config("configs/demo.yaml").model) and hp["world"] == 2
    assert hp["zero_stage"] == 2 and hp["name"] == "stackformer-demo"
    # export -> a fresh process loads and samples
    e = subprocess.run([sys.executable, "-m", "mqscale.export", str(run), str(tmp_path / "exp")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    code = ("import torch; from mqscale.train.config import STACKFORMER; from mqscale.models.stackformer import sample;"
            f"m, c = STACKFORMER.load('{tmp_path / 'exp'}'); codes, pos = sample(m, torch.arange(4));"
            "assert (pos.diff(dim=1) > 0).all(); print('sampled', tuple(codes.shape))")
    s = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and "sampled (4, 32)" in s.stdout, s.stderr
    # relaunch with more steps continues from step 12; the third save leaves the last two (keep_last=2)
    again = train(demo_data, tmp_path, "train.max_steps=14", "checkpoint.every_steps=6", "checkpoint.keep_last=2")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "resumed from" in out and "at step 12" in out
    assert [f.step for f in CheckpointStore(str(run)).candidates()] == [14, 12]
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_000000012",
                                                                            "checkpoint_000000014"]


def test_zero3_two_workers_learn(demo_data, tmp_path):
    r = train(demo_data, tmp_path, "train.max_steps=10", "deepspeed.zero_stage=3", "logging.image_every=5")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    ls = losses(out)
    assert ls and ls[-1] < ls[0]
    # counted whole although every rank holds only its partition
    ea = events(tmp_path / "stackformer-demo" / "tb")
    hp = hparams(ea)
    assert hp["params"] == param_count(load_train_config("configs/demo.yaml").model) and hp["zero_stage"] == 3
    # sample grids under ZeRO-3 too: the partitioned weights are gathered for the while
    assert [e.step for e in ea.Images("samples/class_rows")] == [5, 10]
    e = subprocess.run([sys.executable, "-m", "mqscale.export", str(tmp_path / "stackformer-demo"),
                        str(tmp_path / "exp")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    m, _ = STACKFORMER.load(tmp_path / "exp")
    assert m.cfg.grid == 8


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
    r = train(demo_data, tmp_path, "train.max_steps=4", "logging.tokenizer=", "checkpoint.every_steps=1",
              "checkpoint.keep_last=2", launcher=ds)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    store = CheckpointStore(str(tmp_path / "stackformer-demo"))
    found = store.latest_valid()
    assert found is not None and found.step == 4 and found.marker["world"] == 2
    assert [f.step for f in store.candidates()] == [4, 3]                     # 4 saves, the last 2 kept
    assert sorted(p.name for p in (tmp_path / "stackformer-demo").iterdir() if p.name.startswith("checkpoint_")) \
        == ["checkpoint_000000003", "checkpoint_000000004"]
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
    TOKENIZER.save(MQVAE(cfg.model).eval(), cfg, tmp_path / "other")
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
        # TensorBoard reached the bucket after the writer closed: the last step's scalars and the hparams
        import s3fs
        bucket = s3fs.S3FileSystem(**s3)
        tb = "mqscale-test/runs/stackformer-demo/tb"
        assert any("tfevents" in p for p in bucket.ls(tb))
        bucket.get(tb + "/", str(tmp_path / "tb"), recursive=True)
        ea = events(tmp_path / "tb")
        assert 8 in [e.step for e in ea.Scalars("loss/total")]
        assert hparams(ea)["params"] == param_count(load_train_config("configs/demo.yaml").model)
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------- one rank, in a process of its own

def case_unloadable_checkpoint(tmp: str) -> None:
    import shutil

    from mqscale.core.checkpoint import local_files, write_marker
    from mqscale.core.errors import CheckpointError
    tmp = Path(tmp)
    one_rank_run(tmp, "a", "train.max_steps=1").fit()
    ckpt = tmp / "hollow"
    shutil.copytree(tmp / "a" / "checkpoint_000000001", ckpt)
    (ckpt / "ds" / "mp_rank_00_model_states.pt").unlink()
    write_marker(ckpt, local_files(ckpt), 1, 1)                        # a marker that verifies
    CheckpointStore(str(tmp / "b")).open_url(str(ckpt))
    with pytest.raises(CheckpointError, match=f"^{ckpt}: DeepSpeed could not load it"):
        one_rank_run(tmp, "b", "train.max_steps=2", f"checkpoint.resume_from={ckpt}")
    assert not any((tmp / "b").glob("checkpoint_*"))                   # and no fresh start


def test_checkpoint_deepspeed_cannot_load_is_a_checkpoint_error(tmp_path):
    """A checkpoint whose marker verifies but that holds nothing DeepSpeed can load stops the run
    with one CheckpointError naming it: never a fresh start, never DeepSpeed's bare assert."""
    in_one_rank(__name__, "case_unloadable_checkpoint", str(tmp_path))


def case_export_masters(tmp: str, stages: list[int]) -> None:
    for stage in stages:
        export_masters(Path(tmp) / f"zero{stage}", stage)


def export_masters(tmp: Path, stage: int) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from mqscale.train.export import export
    t = one_rank_run(tmp, "run", "train.max_steps=3", f"deepspeed.zero_stage={stage}")
    t.fit()
    opt = t.engine.optimizer
    masters = {}
    for n, p in t.engine.module.named_parameters():
        m = safe_get_full_fp32_param(p) if stage else next(   # ZeRO-0: the bf16 wrapper's fp32 copies
            f for gp, gf in zip(opt.fp16_groups, opt.fp32_groups) for q, f in zip(gp, gf) if q is p)
        masters[n] = m.detach().float().reshape(getattr(p, "ds_shape", p.shape))
    assert all(p.dtype == torch.bfloat16 for p in t.engine.module.parameters()), stage
    export(str(tmp / "run"), str(tmp / "exp"))
    model, _ = STACKFORMER.load(tmp / "exp")
    exported = dict(model.named_parameters())
    assert exported.keys() == masters.keys()
    for n, m in masters.items():
        assert torch.equal(exported[n].float(), m), (stage, n)
    assert any((m != m.bfloat16().float()).any() for m in masters.values())   # masters are not bf16 copies


def test_export_takes_fp32_master_weights(tmp_path):
    """bf16 training keeps fp32 masters beside the bf16 module; export takes the masters, whatever
    DeepSpeed names its files (bf16_zero_pp_rank_* under ZeRO-1/2, one model-states file under ZeRO-0)."""
    in_one_rank(__name__, "case_export_masters", str(tmp_path), [0, 2, 3])
