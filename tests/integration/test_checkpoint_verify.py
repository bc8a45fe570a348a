"""Checkpoint integrity: the completion marker, and `python -m mqscale.checkpoint verify`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mqscale.core.checkpoint import MARKER, CheckpointStore, checkpoint_name
from mqscale.core.errors import CheckpointError
from tests.helpers.checkpoints import make_checkpoint

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mqscale.checkpoint", "verify", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_a_whole_checkpoint_verifies(tmp_path):
    d = make_checkpoint(tmp_path, 10)
    r = verify(str(d))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK") and "step 10, 4 files, saved by 2 workers" in r.stdout


@pytest.mark.parametrize("damage,why", [
    (lambda d: (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 299), "is 1495 bytes"),
    (lambda d: (d / "run_config.json").write_text("[]"), "another sha256"),
    (lambda d: (d / "ds" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(), "is missing"),
    (lambda d: (d / MARKER).unlink(), f"no {MARKER}"),
    (lambda d: (d / MARKER).write_text('{"step": 10, "fil'), "not valid JSON"),
    (lambda d: (d / MARKER).write_text('{"step": "ten", "files": {}}'), "lacks step"),
    (lambda d: (d / MARKER).write_text(json.dumps({"step": 10, "files": {"../../etc/passwd": {
        "size": 1, "sha256": "0" * 64}}})), "unsafe file name '../../etc/passwd'"),
])
def test_a_damaged_checkpoint_is_named_with_why(tmp_path, damage, why):
    d = make_checkpoint(tmp_path, 10)
    damage(d)
    r = verify(str(d))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("DAMAGED") and str(d) in r.stdout and why in r.stdout, r.stdout
    assert r.stderr == ""


def test_a_run_reports_every_checkpoint_and_its_newest_decides(tmp_path):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    (tmp_path / checkpoint_name(30) / "ds").mkdir(parents=True)  # a save that died before its marker
    r = verify(str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["ok"] is True
    by_url = {Path(c["url"]).name: c for c in body["checkpoints"]}
    assert by_url[checkpoint_name(30)]["ok"] is False and "incomplete" in by_url[checkpoint_name(30)]["why"]
    assert by_url[checkpoint_name(20)]["ok"] and by_url[checkpoint_name(10)]["ok"]
    (newest / "run_config.json").write_text("[]")
    r = verify(str(tmp_path))
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert any(line.startswith("DAMAGED") and checkpoint_name(20) in line for line in lines)
    assert any(line.startswith("OK") and checkpoint_name(10) in line for line in lines)


def test_not_a_checkpoint_is_one_line(tmp_path):
    r = verify(str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "neither a checkpoint" in r.stderr


def test_resume_from_a_damaged_marker_is_one_clear_error(tmp_path):
    d = make_checkpoint(tmp_path / "other", 5)
    (d / MARKER).write_text("not json")
    store = CheckpointStore(str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        store.open_url(str(d))
    assert store.latest_valid() is None and sorted(store.scan()[1]) == []


def test_verify_on_object_storage(s3, tmp_path):
    import s3fs
    d = make_checkpoint(tmp_path / "local", 7)
    fs = s3fs.S3FileSystem(**s3)
    fs.put(str(d), f"mqscale-test/verify-run/{d.name}", recursive=True)
    opts = json.dumps(s3)
    r = verify(f"s3://mqscale-test/verify-run/{d.name}", "--storage-options", opts)
    assert r.returncode == 0, r.stdout + r.stderr
    fs.pipe(f"mqscale-test/verify-run/{d.name}/run_config.json", b"[]")
    r = verify("s3://mqscale-test/verify-run", "--storage-options", opts)
    assert r.returncode == 1 and "another sha256" in r.stdout
    assert "testing" not in r.stdout + r.stderr  # the credentials are never printed
