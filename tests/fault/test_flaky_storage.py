"""Object storage that fails: 10% of requests fail transiently (before or after reaching the
server), through a loopback proxy in front of the real S3 API. Training (data, checkpoints,
TensorBoard, Ray's own storage) and tokenization finish with results identical to a run without
failures. A permanent 403 stops the run with one line naming the bucket and key."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import s3fs
import torch

from mqscale.core.loopback_s3 import FlakyS3
from mqscale.tokenize.__main__ import main as tokenize_main
from mqscale.train.config import STACKFORMER
from mqscale.train.export import export
from tests.helpers.training import train

pytestmark = pytest.mark.integration

BUCKET = "mqscale-test"


@pytest.fixture(scope="module")
def on_s3(fault_data, s3):
    """The fault data's image and token shards in the bucket."""
    fs = s3fs.S3FileSystem(**s3)
    for name in ("shapes", "tokens"):
        fs.put(str(fault_data / name) + "/", f"{BUCKET}/flaky/{name}/", recursive=True)
    return f"s3://{BUCKET}/flaky"


def via(s3: dict, endpoint: str) -> dict:
    return {**s3, "endpoint_url": endpoint}


def train_on_s3(fault_data, tmp_path, data: str, so: dict, name: str, *extra):
    opts = json.dumps(so)
    return train(fault_data, tmp_path, "train.max_steps=6", "checkpoint.every_steps=3", "logging.tokenizer=",
                 f"data.train_url={data}/tokens", f"data.storage_options={opts}", f"checkpoint.dir=s3://{BUCKET}/runs",
                 f"checkpoint.storage_options={opts}", f"name={name}", *extra)


# moto takes any credentials: these must never be written anywhere, nor printed
KEY, SECRET = "AKIAMQSCALEKEY0000042", "mqscale-SECRET-never-logged-0042"


def leaks(secrets: list[str], run_output: str, *roots: Path, s3_prefix: str, s3: dict) -> list[str]:
    """Where any of ``secrets`` appears: the run's output, files under ``roots``, objects under
    ``s3_prefix``."""
    found = [f"output: {x}" for x in secrets if x in run_output]
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                found += [f"{p}: {x}" for x in secrets if x.encode() in data]
    fs = s3fs.S3FileSystem(**s3)
    for key in fs.find(s3_prefix):
        data = fs.cat(key)
        found += [f"s3://{key}: {x}" for x in secrets if x.encode() in data]
    return found


def test_ten_percent_transient_failures_change_nothing(fault_data, tmp_path, s3, on_s3):
    direct = train_on_s3(fault_data, tmp_path / "a", on_s3, {**s3, "key": KEY, "secret": SECRET}, "direct")
    out = direct.stdout + direct.stderr
    assert direct.returncode == 0, out[-3000:]
    # security: the storage credentials reach no log line, no checkpoint, no event file, no Ray log
    ray_logs = Path("/tmp/ray/session_latest/logs")
    assert not leaks([KEY, SECRET], out, tmp_path / "a", *([ray_logs.resolve()] if ray_logs.exists() else []),
                     s3_prefix=f"{BUCKET}/runs/direct", s3=s3)
    with FlakyS3(s3["endpoint_url"], failure_rate=0.1, seed=7) as proxy:
        flaky = train_on_s3(fault_data, tmp_path / "b", on_s3, via(s3, proxy.endpoint), "flaky")
        out = flaky.stdout + flaky.stderr
        assert flaky.returncode == 0, out[-4000:]
        assert proxy.injected >= 10, (proxy.requests, proxy.injected)     # it really was flaky
        print(f"training through the proxy: {proxy.requests} requests, {proxy.injected} failed transiently")
        training_failures = proxy.injected
        # tokenization through the proxy as well: the same bytes as without it
        assert tokenize_main(["--tokenizer", str(fault_data / "tokenizer"), "--input", f"{on_s3}/shapes",
                              "--output", f"{on_s3}/tok-flaky", "--workers", "0", "--no-progress",
                              "--storage-options", json.dumps(via(s3, proxy.endpoint))]) == 0
        assert proxy.injected > training_failures
    assert tokenize_main(["--tokenizer", str(fault_data / "tokenizer"), "--input", f"{on_s3}/shapes", "--output",
                          f"{on_s3}/tok-direct", "--workers", "0", "--no-progress",
                          "--storage-options", json.dumps(s3)]) == 0
    fs = s3fs.S3FileSystem(**s3)
    digest = {d: {p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat(p)).hexdigest()
                  for p in fs.ls(f"{BUCKET}/flaky/{d}") if p.endswith(".tar")} for d in ("tok-flaky", "tok-direct")}
    assert digest["tok-flaky"] == digest["tok-direct"] and len(digest["tok-direct"]) == 4
    # the two training runs: the same weights, bit for bit
    for name in ("direct", "flaky"):
        export(f"s3://{BUCKET}/runs/{name}", str(tmp_path / f"exp-{name}"), s3)
    a, _ = STACKFORMER.load(tmp_path / "exp-direct")
    b, _ = STACKFORMER.load(tmp_path / "exp-flaky")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert any(p.endswith("tfevents") or "tfevents" in p for p in fs.find(f"{BUCKET}/runs/flaky/tb"))


def test_a_permanent_403_stops_the_run_naming_bucket_and_key(fault_data, tmp_path, s3, on_s3):
    with FlakyS3(s3["endpoint_url"]) as proxy:
        proxy.denied.add("tokens/tokens-000001.tar")
        r = train_on_s3(fault_data, tmp_path, on_s3, via(s3, proxy.endpoint), "denied", "ray.max_failures=0")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("training failed:"), r.stderr[-2000:]
    assert f"s3://{BUCKET}/flaky/tokens/tokens-000001.tar" in last, last
    assert "403" in last or "Forbidden" in last or "AccessDenied" in last, last
    assert proxy.refused >= 1
