"""Object storage on a real S3 API (moto server on loopback): write, verify, stream back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mqscale.core import storage
from mqscale.core.errors import ManifestError
from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.manifest import read_manifest
from mqscale.data.synthetic import token_set
from tests.helpers.shards import image_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_image_shards_round_trip_through_s3(tmp_path, s3):
    image_files(tmp_path / "src", 23, size=(30, 20))
    url = "s3://mqscale-test/images-rt"
    so = json.dumps(s3)
    r = subprocess.run([sys.executable, "-m", "data_tools.shard_images", str(tmp_path / "src"), url,
                        "--resolution", "16", "--shard-size", "5", "--workers", "2", "--no-progress",
                        "--storage-options", so], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    m = read_manifest(url, s3)
    assert m.total == 23 and len(m.shards) == 5
    v = subprocess.run([sys.executable, "-m", "data_tools.verify", url, "--storage-options", so],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert v.returncode == 0 and "OK: 5 shards, 23 samples" in v.stdout, v.stdout + v.stderr
    cfg = DataConfig(batch_size=4, num_workers=2, resolution=16, storage_options=s3)
    ids = []
    for rank in range(2):
        for b in StreamingLoader(url, cfg, rank=rank, world=2):
            assert b["images"].shape == (4, 16, 16, 3)
            ids += b["sample_id"][b["mask"]].tolist()
    assert sorted(ids) == list(range(23))
    again = subprocess.run([sys.executable, "-m", "data_tools.shard_images", str(tmp_path / "src"), url,
                            "--resolution", "16", "--shard-size", "5", "--no-progress", "--storage-options", so],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "written 0, kept 5" in again.stdout, again.stdout + again.stderr


def test_token_shards_stream_from_s3_like_from_disk(tmp_path, s3):
    token_set(str(tmp_path), [50, 30])
    token_set("s3://mqscale-test/tok", [50, 30], storage_options=s3)
    cfg = DataConfig(batch_size=8, num_workers=0, shuffle_buffer=20)
    local = list(StreamingLoader(str(tmp_path), cfg))
    remote = list(StreamingLoader("s3://mqscale-test/tok", DataConfig(**{**cfg.__dict__, "storage_options": s3})))
    assert len(local) == len(remote)
    for a, b in zip(local, remote):
        assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["sample_id"], b["sample_id"])


def test_brace_pattern_without_manifest(s3):
    token_set("s3://mqscale-test/pat", [10, 12, 9], storage_options=s3)
    url = "s3://mqscale-test/pat/tokens-{000000..000002}.tar"
    loader = StreamingLoader(url, DataConfig(batch_size=4, num_workers=0, storage_options=s3))
    assert loader.kind == "tokens" and loader.src.total == 31
    assert sorted(i for b in loader for i in b["sample_id"][b["mask"]].tolist()) == list(range(31))


def test_object_store_write_is_atomic(s3):
    url = "s3://mqscale-test/atomic/x.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(url, s3) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("crash mid-write")
    assert not storage.exists(url, s3)
    storage.write_bytes(url, b"whole", s3)
    assert storage.read_bytes(url, s3) == b"whole"


def test_missing_manifest_is_a_clear_error(s3):
    with pytest.raises(ManifestError, match="s3://mqscale-test/nothing-here/manifest.json: no manifest"):
        StreamingLoader("s3://mqscale-test/nothing-here", DataConfig(storage_options=s3))
