"""Reliability figures: what the fault suite's faults cost, measured on the real stack.

    python bench/faults.py [--kills 3] [--skip kills,storage,data,checkpoint]

Prints one JSON object with:
- ``kills``: a debug-config run on 2 Ray workers (ZeRO-2, bf16, CPU) killed ``--kills`` times at
  fixed steps; per kill, seconds from the kill until the restarted group has finished its first
  step again (Ray restarting the workers, DeepSpeed initialising, verification and load, one
  step), and the steps re-done; whether the final weights equal the uninterrupted run's.
- ``storage``: a training run and a tokenization through a loopback proxy that fails 10% of the
  S3 requests transiently; the failures survived and whether results equal a run without them.
- ``data``: 10,000 token sequences with 1% corrupt rows and a pickle member: rows skipped per
  10k against planted, and loader throughput with the checks on.
- ``checkpoint``: save and load of a ~30M-parameter Stackformer with its AdamW state (one rank),
  split into DeepSpeed's own work, the sha256 pass, the copy to the run's storage and the
  verification on load: the integrity overhead in percent; and the universal conversion of that
  checkpoint (what continuing on another number of workers costs under ZeRO 1-3), seconds per GB.
- ``elastic``: an elastic run (``ray.num_workers: [1, 2]``, ZeRO-2) on a simulated 2-node Ray
  cluster that loses one node after its step-3 checkpoint: seconds from the loss until the
  1-worker group has finished its first step (Ray noticing and restarting the group, the
  universal conversion, DeepSpeed initialising and loading, one step), the steps re-done, and
  whether every sample of the epoch was trained on exactly once.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_member, demo_data, environment, members_of, train  # noqa: E402

COMMON = ["train.max_steps=15", "checkpoint.every_steps=3", "logging.tokenizer=", "logging.log_every=5",
          "checkpoint.keep_last=6"]


def _weights_diff(a_run: Path, b_run: Path, work: Path) -> float:
    from mqscale.train.config import STACKFORMER
    from mqscale.train.export import export
    diffs = []
    for name, run in (("a", a_run), ("b", b_run)):
        export(str(run), str(work / f"exp-{name}"))
    a, _ = STACKFORMER.load(work / "exp-a")
    b, _ = STACKFORMER.load(work / "exp-b")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        diffs.append((x - y).abs().max().item())
    return max(diffs)


def kills(data: Path, work: Path, n: int) -> dict:
    clean = train(data, work / "clean", *COMMON)
    assert clean.returncode == 0, clean.stderr[-2000:]
    steps = [4 + 10 * i // n for i in range(n)]            # spread over steps 4..13
    flags = [work / f"kill{i}.flag" for i in range(n)]
    spec = ",".join(f"{s}:{i % 2}:{f}" for i, (s, f) in enumerate(zip(steps, flags)))
    t0 = time.time()
    trace = work / "trace"
    run = train(data, work / "killed", *COMMON, f"ray.max_failures={n}",
                env={"MQSCALE_FAULT_EXIT": spec, "MQSCALE_TRACE_SAMPLES": str(trace)})
    wall = time.time() - t0
    assert run.returncode == 0, run.stderr[-3000:]
    done = sorted((rec["time"], rec["step"], rec["pid"]) for rank in (0, 1)
                  for rec in map(json.loads, (trace / f"rank{rank}.jsonl").read_text().splitlines()))
    per_kill = []
    for k, f in zip(steps, flags):
        at = f.stat().st_mtime
        old = {pid for t, _, pid in done if t <= at}
        # the first step a restarted worker (a process not seen before the kill) finished
        t, step = next((t, s) for t, s, pid in done if t > at and pid not in old)
        per_kill.append({"killed_after_step": k, "resumed_from_step": step - 1, "steps_redone": k - (step - 1),
                         "seconds_until_training_again": round(t - at, 1)})
    clean_run, killed_run = work / "clean" / "stackformer-demo", work / "killed" / "stackformer-demo"
    return {"kills_survived": sum(f.exists() for f in flags), "max_failures": n, "per_kill": per_kill,
            "seconds_until_training_again_median": sorted(k["seconds_until_training_again"]
                                                          for k in per_kill)[len(per_kill) // 2],
            "wall_s_killed_run": round(wall, 1),
            "final_weights_max_abs_diff_vs_uninterrupted": _weights_diff(clean_run, killed_run, work)}


def storage(data: Path, work: Path, rate: float) -> dict:
    import s3fs

    from mqscale.core.loopback_s3 import FlakyS3, loopback_s3
    from mqscale.tokenize.__main__ import main as tokenize_main
    out = {"failure_rate": rate}
    with loopback_s3() as so:
        fs = s3fs.S3FileSystem(**so)
        fs.mkdir("bench")
        for name in ("shapes", "tokens"):
            fs.put(str(data / name) + "/", f"bench/{name}/", recursive=True)

        def run(opts: dict, name: str):
            j = json.dumps(opts)
            t = time.time()
            r = train(data, work / name, "train.max_steps=6", "checkpoint.every_steps=3", "logging.tokenizer=",
                      "data.train_url=s3://bench/tokens", f"data.storage_options={j}",
                      "checkpoint.dir=s3://bench/runs", f"checkpoint.storage_options={j}", f"name={name}")
            assert r.returncode == 0, r.stderr[-3000:]
            return time.time() - t

        def tok(opts: dict, name: str) -> dict:
            assert tokenize_main(["--tokenizer", str(data / "tokenizer"), "--input", "s3://bench/shapes", "--output",
                                  f"s3://bench/{name}", "--workers", "0", "--no-progress",
                                  "--storage-options", json.dumps(opts)]) == 0
            return {p: hashlib.sha256(fs.cat(p)).hexdigest() for p in fs.ls(f"bench/{name}") if p.endswith(".tar")}

        direct_s = run(so, "direct")
        direct_tok = tok(so, "tok-direct")
        with FlakyS3(so["endpoint_url"], rate, seed=11) as proxy:
            flaky = {**so, "endpoint_url": proxy.endpoint}
            flaky_s = run(flaky, "flaky")
            train_failures, train_requests = proxy.injected, proxy.requests
            flaky_tok = tok(flaky, "tok-flaky")
            out["training"] = {"requests": train_requests, "transient_failures_survived": train_failures,
                               "wall_s": round(flaky_s, 1), "wall_s_without_failures": round(direct_s, 1)}
            out["tokenization"] = {"requests": proxy.requests - train_requests,
                                   "transient_failures_survived": proxy.injected - train_failures}
        from mqscale.train.config import STACKFORMER
        from mqscale.train.export import export
        for name in ("direct", "flaky"):
            export(f"s3://bench/runs/{name}", str(work / f"s3exp-{name}"), so)
        a, _ = STACKFORMER.load(work / "s3exp-direct")
        b, _ = STACKFORMER.load(work / "s3exp-flaky")
        out["training"]["weights_identical"] = all(
            (x == y).all().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        out["tokenization"]["shards_identical"] = sorted(v for v in direct_tok.values()) == sorted(
            v for v in flaky_tok.values())
    return out


def poisoned_loader(work: Path) -> dict:
    import numpy as np

    from mqscale.data.config import DataConfig
    from mqscale.data.loader import StreamingLoader
    from mqscale.data.synthetic import token_set
    from mqscale.data.tokens import TokenMeta, npy_bytes, npy_load
    meta = TokenMeta(grid=8, codebook_size=256, seq_len=16, cond="class", n_classes=10, tokenizer_sha256="")
    base, rows, shards, chunk = work / "poisoned", 1000, 10, 100
    token_set(str(base), [rows] * shards, meta=meta, chunk=chunk)
    g = np.random.default_rng(0)
    planted = 0
    import tarfile
    for i in range(shards):
        shard = base / f"tokens-{i:06d}.tar"
        members = []
        for name, data in members_of(shard):
            if name.endswith(".posbits.npy") and name.startswith("000004."):
                bits = npy_load(data).copy()
                bits[g.choice(chunk, 10, replace=False)] = 0          # 10 of 1000 rows per shard: 1%
                planted += 10
                data = npy_bytes(bits)
            members.append((name, data))
            if name == "000000.codes.npy":
                members.append(("000000.evil.pkl", b"\x80\x04not-a-real-pickle."))
        with tarfile.open(shard, "w") as tf:
            for name, data in members:
                add_member(tf, name, data)
    cfg = DataConfig(batch_size=256, num_workers=0, shuffle=True)
    loader = StreamingLoader(str(base), cfg)
    t = time.perf_counter()
    n = sum(int(b["mask"].sum()) for b in loader)
    dt = time.perf_counter() - t
    st = loader.stats()
    total = rows * shards
    return {"rows": total, "planted_corrupt_rows_per_10k": round(planted / total * 1e4, 1),
            "skipped_per_10k": round(st["invalid_samples"] / total * 1e4, 1), "delivered": n,
            "refused_members": st["refused_members"], "sequences_per_s": round(n / dt)}


@contextmanager
def one_rank():
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def checkpoint(work: Path) -> dict:
    from mqscale.core.checkpoint import Checkpoint, checkpoint_name, local_files
    from mqscale.core.session import StorageSession
    from mqscale.data.synthetic import token_set
    from mqscale.data.tokens import TokenMeta
    from mqscale.models.stackformer.counting import param_count
    from mqscale.train.config import load_train_config
    from mqscale.train.elastic import universal
    from mqscale.train.engine import TAG
    from mqscale.train.trainer import Trainer
    meta = TokenMeta(grid=8, codebook_size=256, seq_len=16, cond="class", n_classes=10, tokenizer_sha256="")
    token_set(str(work / "tokens"), [64], meta=meta)
    over = [f"data.train_url={work / 'tokens'}", f"checkpoint.dir={work}", "name=ckpt", "logging.tokenizer=",
            "ray.num_workers=1", "data.batch_size=8", "model.n_embd=640", "model.n_head=10", "model.n_code_layer=4",
            "model.n_pos_layer=2", "train.max_steps=1", "deepspeed.zero_stage=1"]
    cfg = load_train_config("configs/demo.yaml", over)
    with one_rank():
        t = Trainer(cfg, StorageSession(str(work / "ckpt"), None, 3))
        t.fit()                                  # one step, so the optimizer holds its moments
        stage = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
        rounds = []
        for _ in range(3):
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir()
            a = time.perf_counter()
            t.engine.save_checkpoint(str(stage), tag=TAG, client_state={"step": 1})
            b = time.perf_counter()
            files = local_files(stage)
            c = time.perf_counter()
            url = t.store.upload(stage, checkpoint_name(100), list(files))
            d = time.perf_counter()
            found = Checkpoint(url, 100, {"files": files})
            e = time.perf_counter()
            why = t.store.verify(found)
            f = time.perf_counter()
            assert why is None
            local = Path(tempfile.mkdtemp(prefix="bench-load-"))
            t.store.download(found, local, rank=0)
            g = time.perf_counter()
            t.engine.load_checkpoint(str(local), tag=TAG, load_lr_scheduler_states=False)
            h = time.perf_counter()
            shutil.rmtree(local, ignore_errors=True)
            rounds.append({"deepspeed_save_s": b - a, "sha256_s": c - b, "upload_s": d - c, "verify_s": f - e,
                           "download_s": g - f, "deepspeed_load_s": h - g})
        shutil.rmtree(stage, ignore_errors=True)
        size = sum(v["size"] for v in files.values())
        own = t.store.candidates()[0]           # the run's own checkpoint, as a resize converts it
        a = time.perf_counter()
        conv = universal(t.store, own, TAG)
        convert_s = time.perf_counter() - a
        own_gb = sum(v["size"] for v in own.marker["files"].values()) / 1e9
    med = {k: sorted(r[k] for r in rounds)[1] for k in rounds[0]}
    save = med["deepspeed_save_s"] + med["sha256_s"] + med["upload_s"]
    load = med["verify_s"] + med["download_s"] + med["deepspeed_load_s"]
    return {"params": param_count(cfg.model), "checkpoint_mb": round(size / 2 ** 20, 1),
            **{k: round(v, 3) for k, v in med.items()},
            "save_s": round(save, 3), "load_s": round(load, 3),
            "verification_overhead_save_pct": round(100 * med["sha256_s"] / save, 1),
            "verification_overhead_load_pct": round(100 * med["verify_s"] / load, 1),
            "universal_conversion": {"source_gb": round(own_gb, 3), "seconds": round(convert_s, 2),
                                     "converting_and_checking_s": conv.marker["convert_s"],
                                     "seconds_per_gb": round(convert_s / own_gb, 1)}}


def elastic(data: Path, work: Path) -> dict:
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from mqscale.core.checkpoint import CheckpointStore
    from mqscale.train.__main__ import main as train_main
    trace = work / "trace"
    os.environ.update({"MQSCALE_TRACE_SAMPLES": str(trace), "MQSCALE_FAULT_SLOW": "0.5"})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    store = CheckpointStore(str(work / "runs" / "stackformer-demo"))
    removed: list[float] = []

    def lose_a_node() -> None:
        end = time.time() + 600
        def past_a_checkpoint() -> bool:    # every file of it there, and a step trained after it
            last = store.latest_valid()
            steps = [json.loads(x)["step"] for f in trace.glob("rank*.jsonl") for x in f.read_text().splitlines()]
            return last is not None and last.step >= 3 and max(steps, default=0) > last.step

        while time.time() < end and not past_a_checkpoint():
            time.sleep(0.2)
        removed.append(time.time())
        cluster.remove_node(second)

    try:
        ray.init(address=cluster.address)
        watcher = threading.Thread(target=lose_a_node, daemon=True)
        watcher.start()
        t0 = time.time()
        rc = train_main(["--config", "configs/demo.yaml", f"data.train_url={data / 'tokens'}", "logging.tokenizer=",
                         f"checkpoint.dir={work / 'runs'}", "data.batch_size=8", "train.global_batch=16",
                         "ray.num_workers=[1, 2]", "ray.max_failures=3", *COMMON])
        wall = time.time() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k in ("MQSCALE_TRACE_SAMPLES", "MQSCALE_FAULT_SLOW"):
            os.environ.pop(k, None)
    assert rc == 0 and removed
    recs = sorted((json.loads(x) for f in trace.glob("rank*.jsonl") for x in f.read_text().splitlines()),
                  key=lambda r: r["time"])
    lost = removed[0]
    before = max(r["step"] for r in recs if r["world"] == 2 and r["time"] <= lost)
    first = next(r for r in recs if r["world"] == 1)
    last = {}
    for r in recs:
        last[r["step"]] = r["gen"]
    seen = sorted(i for r in recs if last[r["step"]] == r["gen"] for i in r["ids"])
    return {"workers": "[1, 2]", "zero_stage": 2, "node_lost_after_step": before,
            "resumed_from_step": first["resumed_at"], "steps_redone": before - first["resumed_at"],
            "seconds_until_training_again": round(first["time"] - lost, 1), "run_wall_s": round(wall, 1),
            "each_sample_once": seen == list(range(240))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--failure-rate", type=float, default=0.1)
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: "
                   "kills,storage,data,checkpoint,elastic")
    ns = p.parse_args()
    os.chdir(ROOT)
    skip = set(filter(None, ns.skip.split(",")))
    out = {"bench": "faults", "date": datetime.date.today().isoformat(), **environment(),
           "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as d, contextlib.redirect_stdout(sys.stderr):
        work = Path(d)
        if skip - {"data", "checkpoint"} != {"kills", "storage", "elastic"}:
            data = demo_data(work / "data")
        if "kills" not in skip:
            out["kills"] = kills(data, work / "k", ns.kills)
        if "storage" not in skip:
            out["storage"] = storage(data, work / "s", ns.failure_rate)
        if "data" not in skip:
            out["data"] = poisoned_loader(work)
        if "checkpoint" not in skip:
            (work / "c").mkdir()
            out["checkpoint"] = checkpoint(work / "c")
        if "elastic" not in skip:
            out["elastic"] = elastic(data, work / "e")
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    sys.stdout.flush()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
