"""A run continued on another number of workers: 2 -> 1 (``--resume-from`` onto 1 worker) and
1 -> 2 (the run relaunched with ``ray.num_workers`` changed), under ZeRO-0, 2 and 3. It finishes;
the sample trace shows every sample of the epoch trained on exactly once across the change; the
fp32 masters and Adam moments after the change equal the ones saved, gathered whole; the loss goes
on where the uninterrupted 2-worker run's is; the final weights are close to that run's (not
bitwise: the steps after the change sum other micro-batches). Bad input is one line before any
worker starts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mqscale.core.checkpoint import MARKER, CheckpointStore, local_files, write_marker
from mqscale.train.config import STACKFORMER
from mqscale.train.elastic import RESIZE, conversion_name
from tests.helpers.training import ROOT, events, train

pytestmark = pytest.mark.integration

EPOCH = 240          # sequences in the fault data; 15 steps of global batch 16 are one epoch
COMMON = ["checkpoint.every_steps=3", "logging.tokenizer=", "checkpoint.keep_last=6", "logging.log_every=1"]
LOSS_TOL = 0.1       # mean over steps 7-15; a restart from scratch is ~1 above the run's loss there
STEP_TOL = 0.75      # any one step (16-sample batches differ: up to ~0.45 seen)
WEIGHT_TOL = 0.05
DS = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--module"]


def env(d: Path) -> dict:
    return {"MQSCALE_TRACE_SAMPLES": str(d / "trace"), "MQSCALE_DUMP_OPTIMIZER": str(d / "dump")}


def traced(trace_dir: Path, steps=range(1, 10 ** 6)) -> list[int]:
    """Every sample id the steps in ``steps`` finally trained on, over all ranks: a step done
    again after a restart or a resize counts once, as its last worker group did it (the ranks of
    the attempt it replaced may be gone, their lines stay)."""
    recs = [json.loads(x) for f in sorted(trace_dir.glob("rank*.jsonl")) for x in f.read_text().splitlines()]
    last = {}
    for rec in sorted(recs, key=lambda r: r["time"]):
        last[rec["step"]] = rec["gen"]
    return [i for rec in recs if rec["step"] in steps and last[rec["step"]] == rec["gen"] for i in rec["ids"]]


def export(run: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "mqscale.export", str(run), str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return STACKFORMER.load(out)[0].state_dict()


def scalars(tb: Path, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events(tb).Scalars(tag)}


@pytest.fixture(scope="module")
def clean(fault_data, tmp_path_factory):
    """The uninterrupted 2-worker run of each ZeRO stage (made once, on first use)."""
    made: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in made:
            d = tmp_path_factory.mktemp(f"clean-zero{stage}")
            r = train(fault_data, d / "s", *COMMON, "train.max_steps=15", f"deepspeed.zero_stage={stage}", env=env(d))
            assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
            made[stage] = d
        return made[stage]
    return get


VARIANTS = [pytest.param(2, 2, 1, id="zero2-2to1"),
            pytest.param(3, 1, 2, id="zero3-1to2", marks=pytest.mark.heavy),
            pytest.param(2, 1, 2, id="zero2-1to2", marks=pytest.mark.heavy),
            pytest.param(3, 2, 1, id="zero3-2to1", marks=pytest.mark.heavy),
            pytest.param(0, 2, 1, id="zero0-2to1", marks=pytest.mark.heavy)]


@pytest.mark.parametrize("stage,before,after", VARIANTS)
def test_continues_on_another_number_of_workers(fault_data, clean, tmp_path, stage, before, after):
    base = clean(stage)
    run = tmp_path / "s" / "stackformer-demo"
    common = [*COMMON, f"deepspeed.zero_stage={stage}"]
    if before == 2:   # a new run seeded from the clean run's step-6 checkpoint, on 1 worker
        seed = src = base / "s" / "stackformer-demo" / "checkpoint_000000006"
        saved = base / "dump" / "saved-step6-world2.safetensors"
        if stage:     # a conversion an earlier attempt left half-made: ignored, made again
            half = run / conversion_name(CheckpointStore(str(run)).open_url(str(seed)))[0] / "ds"
            half.mkdir(parents=True)
            (half / "latest_universal").write_text("ds")
        r = train(fault_data, tmp_path / "s", *common, "train.max_steps=15", f"ray.num_workers={after}",
                  "--resume-from", str(seed), env=env(tmp_path))
        seen = traced(base / "trace", range(1, 7)) + traced(tmp_path / "trace")
    else:             # the run's own step-6 checkpoint, the run relaunched on 2 workers
        first = train(fault_data, tmp_path / "s", *common, "train.max_steps=6", "ray.num_workers=1",
                      "train.global_batch=16", env=env(tmp_path))
        assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
        saved = tmp_path / "dump" / "saved-step6-world1.safetensors"
        src = run / "checkpoint_000000006"
        r = train(fault_data, tmp_path / "s", *common, "train.max_steps=15", f"ray.num_workers={after}",
                  env=env(tmp_path))
        seen = traced(tmp_path / "trace")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"resized: {before} -> {after} workers at step 6, global batch 16 kept" in out, out[-4000:]
    if stage:
        assert f"universal conversion of {src} (step 6, {before} worker" in out, out[-4000:]
        if before == 2:   # the half-made one was redone; once the run saved its own, it went
            assert "ignored and made again" in out and not any((run / "universal").iterdir())
        else:             # the run still keeps the checkpoint it was made from, so it is kept
            conv = list((run / "universal").iterdir())
            assert len(conv) == 1 and (conv[0] / MARKER).is_file()
    else:
        assert "ZeRO-0: whole copies" in out and not (run / "universal").exists()
    # every sample of the epoch exactly once, across the change
    assert sorted(seen) == list(range(EPOCH))
    # the fp32 masters and both Adam moments the new world starts from are the saved ones
    a, b = load_file(saved), load_file(tmp_path / "dump" / f"restored-step6-world{after}.safetensors")
    assert sorted(a) == sorted(b) and sum(k.endswith("/exp_avg_sq") for k in a) == sum(k.endswith("/fp32") for k in a)
    moments = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moments == 0.0, moments
    # the loss goes on where the uninterrupted run's is, and TensorBoard marks the resize
    ref, got = scalars(base / "s" / "stackformer-demo" / "tb", "loss/total"), scalars(run / "tb", "loss/total")
    jumps = {s: round(got[s] - ref[s], 4) for s in range(7, 16)}
    mean_jump = sum(jumps.values()) / len(jumps)
    # per step the batches differ (the rest of the epoch is split anew): batch noise, no trend
    assert abs(mean_jump) < LOSS_TOL and max(abs(v) for v in jumps.values()) < STEP_TOL, jumps
    assert scalars(run / "tb", "scaling/world_size")[6] == after
    # the checkpoints say which world saved them
    last = CheckpointStore(str(run)).latest_valid()
    assert last.step == 15 and last.marker["world"] == after
    assert json.loads((Path(last.url) / RESIZE).read_text())["world"] == after
    # close to the uninterrupted 2-worker run
    x, y = export(base / "s" / "stackformer-demo", base / "exp"), export(run, tmp_path / "exp")
    diff = max((x[k] - y[k]).abs().max().item() for k in x)
    print(f"RESHARD zero{stage} {before}->{after}: max weight diff vs uninterrupted {diff:.3g}, "
          f"loss diff per step {jumps} (mean {mean_jump:.3g}), moments diff {moments}")
    assert diff < WEIGHT_TOL, diff


def test_deepspeed_launcher_continues_on_another_num_gpus(fault_data, clean, tmp_path):
    seed = clean(2) / "s" / "stackformer-demo" / "checkpoint_000000009"
    r = train(fault_data, tmp_path, *COMMON, "train.max_steps=12", "--resume-from", str(seed), launcher=DS)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "resized: 2 -> 1 workers at step 9, global batch 16 kept (micro-batch x workers x accumulation: " \
           "8 x 2 x 1 -> 8 x 1 x 2)" in out, out[-4000:]
    last = CheckpointStore(str(tmp_path / "stackformer-demo")).latest_valid()
    assert last.step == 12 and last.marker["world"] == 1


def test_universal_conversion_keeps_every_moment_is_reused_and_redone_when_damaged(clean, tmp_path, caplog,
                                                                                   monkeypatch):
    """The conversion of a real 2-rank ZeRO-2 checkpoint: every fp32 master and Adam moment equals
    the one the run gathered whole when it saved; a second call reuses it; a damaged one is
    ignored and made again; the source checkpoint is never written to."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from mqscale.train.elastic import universal
    from mqscale.train.engine import TAG
    base = clean(2)
    src = base / "s" / "stackformer-demo" / "checkpoint_000000003"
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    store = CheckpointStore(str(tmp_path / "run"))
    ckpt = store.open_url(str(src))
    conv = universal(store, ckpt, TAG)
    zero = Path(conv.url) / TAG / "zero"
    gathered = load_file(base / "dump" / "saved-step3-world2.safetensors")
    assert {k.rsplit("/", 1)[0] for k in gathered} == {p.name for p in zero.iterdir() if p.is_dir()}
    for key, want in gathered.items():
        name, kind = key.rsplit("/", 1)
        got = torch.load(zero / name / f"{kind}.pt", map_location="cpu", weights_only=True)["param"]
        assert torch.equal(got.float(), want), key
    caplog.set_level("INFO", logger="mqscale.train")
    assert universal(store, ckpt, TAG).url == conv.url and "reusing" in caplog.text
    victim = sorted(zero.glob("*/exp_avg.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-8] + b"damaged!")
    caplog.clear()
    again = universal(store, ckpt, TAG)
    assert "is incomplete or damaged" in caplog.text and "ignored and made again" in caplog.text
    assert store.verify(again) is None and again.marker["files"] == conv.marker["files"]
    assert before == {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}


def refused(r) -> str:
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    line = r.stderr.strip()
    assert "\n" not in line and "RayTrainWorker" not in r.stdout + r.stderr, line
    return line


def test_bad_resizes_are_one_line_before_any_worker(fault_data, clean, tmp_path):
    seed = clean(2) / "s" / "stackformer-demo" / "checkpoint_000000006"
    # a global batch (16, saved by 2 workers of 8) that 3 workers cannot keep
    line = refused(train(fault_data, tmp_path / "a", *COMMON, "ray.num_workers=3", "--resume-from", str(seed)))
    assert f"{seed} was saved by 2 workers with global batch 16, which 3 workers cannot keep" in line, line
    assert "worlds that keep it: 1, 2; or let the micro-batch shrink: train.min_micro_batch" in line, line
    # nor with micro-batches down to 1 (16 is no multiple of 3), on an elastic range that may get 3
    line = refused(train(fault_data, tmp_path / "a", *COMMON, "ray.num_workers=[2, 3]", "train.min_micro_batch=1",
                         "--resume-from", str(seed)))
    assert "which 3 workers cannot keep" in line and "micro-batches down to 1" in line, line
    # a fresh run whose global batch no world of its range keeps
    line = refused(train(fault_data, tmp_path / "a", *COMMON, "ray.num_workers=3", "train.global_batch=16"))
    assert "train.global_batch: 16 is not divisible by data.batch_size x world = 8 x 3 = 24 (worlds that keep " \
           "it: 1, 2)" in line, line
    # a checkpoint from before checkpoints recorded the ranks' data positions
    old = tmp_path / "old" / "checkpoint_000000006"
    shutil.copytree(seed, old)
    (old / RESIZE).unlink()
    (old / MARKER).unlink()
    write_marker(old, local_files(old), 6, 2)
    line = refused(train(fault_data, tmp_path / "b", *COMMON, "ray.num_workers=1", "--resume-from", str(old)))
    assert f"{old} was saved by 2 workers before checkpoints recorded every rank's data position" in line, line
    assert "relaunch with 2 workers" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert (seed / RESIZE).is_file()                        # the sources are never touched


@pytest.mark.heavy
def test_two_identical_resizes_end_identical(fault_data, clean, tmp_path):
    """Each new rank's random streams come from the checkpoint: the same resize twice, the same weights."""
    seed = clean(2) / "s" / "stackformer-demo" / "checkpoint_000000006"
    got = []
    for name in ("a", "b"):
        r = train(fault_data, tmp_path / name, *COMMON, "train.max_steps=9", "ray.num_workers=1",
                  "train.p_uncond=0.1", "--resume-from", str(seed))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        got.append(export(tmp_path / name / "stackformer-demo", tmp_path / name / "exp"))
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])
