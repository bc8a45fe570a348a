"""Workers killed at random steps, several times in one run: the run ends exactly where an
uninterrupted run ends (fp32 master weights within 1e-6, tokens, data positions), and within the
epoch every sample was trained on exactly once."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mqscale.train.config import STACKFORMER
from tests.helpers.training import ROOT, client_state, train

pytestmark = pytest.mark.integration

EPOCH = 240          # sequences in the fault data; 15 steps of 2 ranks x 8 rows are one epoch


def trajectory(trace_dir: Path, rank: int) -> tuple[dict[int, list[int]], dict[int, list[list[int]]]]:
    """(the ids each step finally trained on, every attempt's ids per step) from a rank's trace:
    a step re-done after a restart is written again, later in the file."""
    final, attempts = {}, {}
    for line in (trace_dir / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        final[rec["step"]] = rec["ids"]
        attempts.setdefault(rec["step"], []).append(rec["ids"])
    return final, attempts


def export(run: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "mqscale.export", str(run), str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)


@pytest.mark.parametrize("kills,stage", [pytest.param(3, 2, id="3-kills-zero2"),
                                         pytest.param(5, 3, id="5-kills-zero3", marks=pytest.mark.heavy)])
def test_repeated_kills_end_as_the_uninterrupted_run(fault_data, tmp_path, kills, stage):
    """The killed run is seeded from the clean run's step-3 checkpoint (--resume-from); once it has
    saved a checkpoint of its own, each restart must take that, never go back to the seed."""
    common = ["train.max_steps=15", "checkpoint.every_steps=3", "logging.tokenizer=", f"ray.max_failures={kills}",
              "logging.log_every=5", f"deepspeed.zero_stage={stage}", "checkpoint.keep_last=6"]
    clean = train(fault_data, tmp_path / "clean", *common, env={"MQSCALE_TRACE_SAMPLES": str(tmp_path / "t-clean")})
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-3000:]
    seed = tmp_path / "clean" / "stackformer-demo" / "checkpoint_000000003"
    rng = random.Random(2026 + kills)
    steps = sorted(rng.sample(range(4, 15), kills))          # after the seed, before the end
    ranks = [rng.randrange(2) for _ in steps]
    flags = [tmp_path / f"kill{i}.flag" for i in range(kills)]
    spec = ",".join(f"{s}:{r}:{f}" for s, r, f in zip(steps, ranks, flags))
    killed = train(fault_data, tmp_path / "killed", *common, "--resume-from", str(seed),
                   env={"MQSCALE_FAULT_EXIT": spec, "MQSCALE_TRACE_SAMPLES": str(tmp_path / "t-killed")})
    out = killed.stdout + killed.stderr
    assert killed.returncode == 0, out[-4000:]
    assert all(f.exists() for f in flags), (steps, ranks)
    # one start and one restart per kill, each of both ranks; every restart from the run's own checkpoint
    own = tmp_path / "killed" / "stackformer-demo"
    assert out.count(f"resumed from {seed} at step 3") == 2 * (1 + sum(k <= 6 for k in steps)), out[-4000:]
    for k in steps:
        back = 3 * ((k - 1) // 3)          # the kill comes before step k's own save
        if back > 3:
            assert f"resumed from {own / f'checkpoint_{back:09d}'} at step {back}" in out, (k, out[-4000:])
    assert out.count("resumed from") == 2 * (1 + kills)
    for d in ("clean", "killed"):
        export(tmp_path / d / "stackformer-demo", tmp_path / d / "exp")
    a, _ = STACKFORMER.load(tmp_path / "clean" / "exp")
    b, _ = STACKFORMER.load(tmp_path / "killed" / "exp")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max().item() <= 1e-6, k
    ca = client_state(tmp_path / "clean" / "stackformer-demo" / "checkpoint_000000015")
    cb = client_state(own / "checkpoint_000000015")
    assert ca["step"] == cb["step"] == 15 and ca["tokens"] == cb["tokens"] > 0
    assert ca["loader"] == cb["loader"] and len(ca["loader"]) == 2            # the same data positions, per rank
    # the data: each step of the killed run trained on what the clean run's did, re-done steps
    # replayed the same rows, and the epoch's 240 samples were each trained on exactly once
    seen = []
    for rank in range(2):
        clean_ids, _ = trajectory(tmp_path / "t-clean", rank)
        final, attempts = trajectory(tmp_path / "t-killed", rank)
        assert sorted(final) == list(range(4, 16))
        for step, tries in attempts.items():
            assert all(t == clean_ids[step] for t in tries), (rank, step)
        assert sum(len(t) > 1 for t in attempts.values()) >= 1           # something was re-done
        seen += [i for step in range(1, 16) for i in clean_ids[step]]
    assert sorted(seen) == list(range(EPOCH))
