"""What a Stackformer run checks before any worker starts, and the DeepSpeed config it builds.

In-process and fast: the DeepSpeed config is plain data, and ``validate_run`` reads only
manifests, listings and markers. The engine cases that must run DeepSpeed (fp32 guarding, CPU
offload with activation checkpointing) each get a one-rank gloo process of their own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mqscale.core.errors import ConfigError
from mqscale.train.config import load_train_config
from mqscale.train.engine import ds_config
from mqscale.train.validate import validate_run
from tests.helpers.checkpoints import make_checkpoint

DEMO = "configs/demo.yaml"


def cfg_of(*overrides: str):
    return load_train_config(DEMO, ["logging.tokenizer=", *overrides])  # (the demo's own tokenizer is not built here)


def test_ds_config_follows_the_run_config():
    ds = ds_config(cfg_of("data.batch_size=4", "train.grad_accum=3", "optim.grad_clip=0.5", "deepspeed.zero_stage=2",
                          "deepspeed.offload_optimizer=cpu", "train.precision=bf16"), world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    # offload needs DeepSpeed's CPU Adam: the same recipe as our AdamW
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.05}}
    nvme = ds_config(cfg_of("deepspeed.zero_stage=3", "deepspeed.offload_param=nvme", "deepspeed.nvme_path=/nvme"), 1)
    assert nvme["zero_optimization"]["offload_param"] == {"device": "nvme", "pin_memory": True,
                                                          "nvme_path": "/nvme"}
    assert "optimizer" not in nvme  # parameters offloaded, optimizer state on the device: our AdamW


@pytest.mark.parametrize("theirs,message", [
    ({"gradient_clipping": 5.0}, "conflicts with the run config on gradient_clipping: ours 1.0 vs 5.0"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage: ours 2 vs 3"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1.0}}}, "sets 'optimizer'; the optimizer and lr schedule"),
    ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler'"),
    ([1, 2], "must hold a JSON object"),
])
def test_expert_json_conflicts_are_one_line(tmp_path, theirs, message):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(theirs))
    with pytest.raises(ConfigError) as e:
        ds_config(cfg_of(f"deepspeed.config_json={p}"), 1)
    assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_expert_json_keeps_its_tuning_and_its_own_fields(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"steps_per_print": 100, "wall_clock_breakdown": True,
                             "zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 5e7},
                             "activation_checkpointing": {"partition_activations": True}}))
    ds = ds_config(cfg_of(f"deepspeed.config_json={p}", "deepspeed.zero_stage=2"), 1)
    assert ds["steps_per_print"] == 100 and ds["wall_clock_breakdown"] is True
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                       "reduce_bucket_size": 5e7}
    assert ds["activation_checkpointing"] == {"partition_activations": True}


def test_optimizer_offload_needs_a_zero_stage():
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: cpu needs deepspeed.zero_stage 1, 2 or 3"):
        cfg_of("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=cpu")


# ---------------------------------------------------------------- validation before workers start

@pytest.fixture
def tokens(tmp_path) -> Path:
    from mqscale.data.synthetic import token_set
    from mqscale.data.tokens import TokenMeta
    meta = TokenMeta(grid=8, codebook_size=256, seq_len=32, cond="class", n_classes=10, tokenizer_sha256="")
    token_set(str(tmp_path / "tokens"), [32, 32, 32], meta=meta)
    return tmp_path / "tokens"


def test_a_shard_the_manifest_lists_but_storage_lacks(tokens):
    cfg = cfg_of(f"data.train_url={tokens}")
    assert validate_run(cfg, 1).total == 96
    victim = sorted(tokens.glob("*.tar"))[1]
    victim.unlink()
    with pytest.raises(ConfigError, match=f"data.train_url: 1 of 3 shards the manifest lists are missing, "
                                          f"e.g. .*{victim.name}"):
        validate_run(cfg, 1)


def test_sample_tokenizer_must_fit_the_model(tokens, tmp_path):
    from mqscale.models.mqvae.model import MQVAE
    from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config
    from mqscale.train.config import STACKFORMER
    tok = load_tokenizer_config("configs/mqvae/demo.yaml", ["model.resolution=64", "data.resolution=64"])  # a 16x16 grid
    TOKENIZER.save(MQVAE(tok.model).eval(), tok, tmp_path / "tok16")
    with pytest.raises(ConfigError, match="model.grid: 8 does not match the tokenizer's grid 16"):
        validate_run(cfg_of(f"data.train_url={tokens}", f"logging.tokenizer={tmp_path / 'tok16'}"), 1)
    from mqscale.models.stackformer.model import Stackformer
    sf = cfg_of()
    STACKFORMER.save(Stackformer(sf.model), sf, tmp_path / "not-a-tokenizer")
    with pytest.raises(ConfigError, match="holds a 'mqscale-stackformer/1' model, not an MQ-VAE tokenizer"):
        validate_run(cfg_of(f"data.train_url={tokens}", f"logging.tokenizer={tmp_path / 'not-a-tokenizer'}"), 1)


def test_resume_checks_before_any_worker(tokens, tmp_path):
    """What a relaunch would resume must be a checkpoint; one from before resize records stays on
    its world (refused with the reason, never restarted); a newer one continues on a world that
    keeps its global batch, and one that cannot is one line naming both sizes and what fits."""
    with pytest.raises(ConfigError, match="checkpoint.resume_from: .*nowhere: no mqscale_complete.json"):
        validate_run(cfg_of("data.batch_size=8", f"data.train_url={tokens}", f"checkpoint.resume_from={tmp_path / 'nowhere'}"), 1)
    old = make_checkpoint(tmp_path / "old", 4, world=2)
    with pytest.raises(ConfigError, match=r"checkpoint.resume_from: .*checkpoint_000000004 was saved by 2 workers "
                                          r"before checkpoints recorded every rank's data position \(resize.json\): "
                                          "it cannot continue on 1 worker with each sample trained on exactly once; "
                                          "relaunch with 2 workers"):
        validate_run(cfg_of("data.batch_size=8", f"data.train_url={tokens}", f"checkpoint.resume_from={old}"), 1)
    validate_run(cfg_of("data.batch_size=8", f"data.train_url={tokens}", f"checkpoint.resume_from={old}"), 2)
    # a run with checkpoints of its own never reads its seed again: a seed deleted since is no error
    run = tmp_path / "runs" / "stackformer-demo"
    make_checkpoint(run, 8, world=1)
    cfg = cfg_of("data.batch_size=8", f"data.train_url={tokens}", f"checkpoint.resume_from={tmp_path / 'deleted-seed'}")
    validate_run(cfg, 1, str(run))
    with pytest.raises(ConfigError, match="^checkpoint: .*saved by 1 workers before checkpoints recorded"):
        validate_run(cfg, [1, 2], str(run))               # an elastic range that may leave its world
    # since resize records: a 2-worker checkpoint of global batch 16 (8 x 2 x 1)
    new = make_checkpoint(tmp_path / "new", 6, world=2, global_batch=16)
    seeded = cfg_of("data.batch_size=8", f"data.train_url={tokens}", f"checkpoint.resume_from={new}")
    validate_run(seeded, [1, 2])                           # 8 x 1 x 2 and 8 x 2 x 1
    with pytest.raises(ConfigError, match=r"^checkpoint.resume_from: .*checkpoint_000000006 was saved by 2 workers "
                                          r"with global batch 16, which 3 workers cannot keep \(data.batch_size 8 x 3 "
                                          r"workers x any train.grad_accum; micro-batches down to 8\): worlds that "
                                          r"keep it: 1, 2; or let the micro-batch shrink: train.min_micro_batch$"):
        validate_run(seeded, 3)
    with pytest.raises(ConfigError, match="which 3 workers cannot keep"):      # the first of the range that cannot
        validate_run(seeded, range(1, 5))
    shrink = cfg_of("data.batch_size=8", f"data.train_url={tokens}", f"checkpoint.resume_from={new}", "train.min_micro_batch=2")
    validate_run(shrink, 4)                                # 4 x 4 x 1
    with pytest.raises(ConfigError, match="worlds that keep it: 1, 2, 4, 8$"):
        validate_run(shrink, 3)


def test_batch_plans_keep_the_global_batch():
    from mqscale.train.elastic import plan_batch
    saved = {"world": 2, "global_batch": 32, "micro_batch": 8, "grad_accum": 2}
    assert str(plan_batch(cfg_of("data.batch_size=8"), 1, saved)) == "32 = 8 x 1 x 4"
    assert str(plan_batch(cfg_of("data.batch_size=8"), 4, saved)) == "32 = 8 x 4 x 1"
    assert str(plan_batch(cfg_of("data.batch_size=8", "train.min_micro_batch=1"), 8, saved)) == "32 = 4 x 8 x 1"
    assert str(plan_batch(cfg_of("data.batch_size=8", "train.global_batch=64"), 2, saved)) == "64 = 8 x 2 x 4"   # asked for: changes
    assert str(plan_batch(cfg_of("data.batch_size=8", "train.grad_accum=3"), 2)) == "48 = 8 x 2 x 3"              # a fresh run: the config's
    with pytest.raises(ConfigError, match="train.global_batch: 16 is not divisible by data.batch_size x world = "
                                          r"8 x 3 = 24 \(worlds that keep it: 1, 2\)"):
        plan_batch(cfg_of("data.batch_size=8", "train.global_batch=16"), 3)


    # an elastic run's fresh batch counts its most workers, whichever number Ray starts it with
    elastic = cfg_of("data.batch_size=8", "ray.num_workers=[1, 2]")
    assert [str(plan_batch(elastic, w)) for w in (1, 2)] == ["16 = 8 x 1 x 2", "16 = 8 x 2 x 1"]
    with pytest.raises(ConfigError, match=r"ray.num_workers: \[1, 3\]: the global batch .*: 24 is not divisible by "
                                          r"data.batch_size x world = 8 x 2 = 16"):
        plan_batch(cfg_of("data.batch_size=8", "ray.num_workers=[1, 3]"), 2)
