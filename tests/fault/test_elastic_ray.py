"""An elastic run (``ray.num_workers: [1, 2]``) on a simulated 2-node Ray cluster, storage on the
loopback S3 server: one node is removed mid-run, Ray restarts the group on 1 worker, which
continues from the newest checkpoint (resharded, the global batch kept) and finishes; given its
node back, the relaunched run grows to 2 again (a node is added to a Ray cluster only from the
main thread, which the trainer holds while it runs, so growth within the run is not shown here). Every sample of the epoch is trained on exactly once."""
from __future__ import annotations

import json
import threading
import time

import pytest

from mqscale.core.checkpoint import CheckpointStore
from tests.fault.test_resharding import traced
from tests.helpers.training import events

pytestmark = [pytest.mark.integration, pytest.mark.heavy]   # minutes: Ray notices a lost node, restarts twice

EPOCH = 240


def wait_for(what, timeout: float, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        got = what()
        if got:
            return got
        time.sleep(every)
    return None


def test_elastic_run_loses_a_node_continues_on_one_and_grows_back(fault_data, tmp_path, s3, capfd, monkeypatch):
    import ray
    import s3fs
    from ray.cluster_utils import Cluster

    from mqscale.train.__main__ import main as train_main
    if ray.is_initialized():
        ray.shutdown()
    trace = tmp_path / "trace"
    monkeypatch.setenv("MQSCALE_TRACE_SAMPLES", str(trace))
    monkeypatch.setenv("MQSCALE_FAULT_SLOW", "0.7")      # slow enough to act on mid-run
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    # a lost node is declared dead after ~10 s, not Ray's default ~30 s (not faster: a loaded machine
    # would miss health checks of nodes that are alive)
    fast = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast})
    second = cluster.add_node(num_cpus=1)
    run = "s3://mqscale-test/elastic/stackformer-demo"
    store = CheckpointStore(run, s3)
    events_at: dict[str, float] = {}

    def world_now() -> int:
        recs = [json.loads(x) for f in trace.glob("rank*.jsonl") for x in f.read_text().splitlines()]
        return max(recs, key=lambda r: r["time"])["world"] if recs else 0

    def max_step() -> int:
        return max((json.loads(x)["step"] for f in trace.glob("rank*.jsonl") for x in f.read_text().splitlines()),
                   default=0)

    def chaos() -> None:
        # the node goes once the run has a checkpoint to continue from (every file of it there: a
        # marker alone is not enough, the other rank may still be uploading its shards) and has
        # trained past it
        def past_a_checkpoint() -> bool:
            last = store.latest_valid()
            return last is not None and last.step >= 3 and max_step() > last.step

        if wait_for(past_a_checkpoint, 240):
            events_at["removed"] = time.time()
            cluster.remove_node(second)
            if wait_for(lambda: world_now() == 1, 240):
                events_at["first_step_s"] = round(time.time() - events_at["removed"], 1)

    try:
        ray.init(address=cluster.address)
        args = ["--config", "configs/demo.yaml", f"data.train_url={fault_data / 'tokens'}", "logging.tokenizer=",
                "checkpoint.dir=s3://mqscale-test/elastic", f"checkpoint.storage_options={json.dumps(s3)}",
                "checkpoint.every_steps=3", "checkpoint.keep_last=6", "data.batch_size=8", "logging.log_every=1",
                "train.global_batch=16", "ray.num_workers=[1, 2]", "ray.max_failures=3", "ray.resize_interval_s=5"]
        watcher = threading.Thread(target=chaos, daemon=True)
        watcher.start()
        assert train_main(args + ["train.max_steps=30"]) == 0
        watcher.join(timeout=5)
        time.sleep(2)  # worker logs reach the driver asynchronously
        logs = "".join(capfd.readouterr())
        assert "removed" in events_at and "first_step_s" in events_at, (events_at, logs[-4000:])
        last = store.latest_valid()
        assert last.step == 30
        assert "resized: 2 -> 1 workers at step" in logs, logs[-4000:]
        assert "resumed from s3://mqscale-test/elastic/stackformer-demo/checkpoint_" in logs
        # exactly once: the first epoch's 240 samples (15 steps of 16), whatever the world at each step
        first = traced(trace, range(1, 16))
        assert sorted(first) == list(range(EPOCH)), len(first)
        second_epoch = traced(trace, range(16, 31))
        assert sorted(second_epoch) == list(range(EPOCH)), len(second_epoch)
        worlds = [json.loads(x)["world"] for f in trace.glob("rank*.jsonl") for x in f.read_text().splitlines()]
        assert 1 in worlds and 2 in worlds
        # the node back (from the main thread: Ray adds a node only there, and the trainer holds it
        # while it runs), and the run relaunched: Ray starts 2 workers, which continue from 1's
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        capfd.readouterr()
        assert train_main(args + ["train.max_steps=33"]) == 0
        time.sleep(2)
        assert "resized: 1 -> 2 workers at step 30" in "".join(capfd.readouterr())
        last = store.latest_valid()
        assert last.marker["world"] == 2
        bucket = s3fs.S3FileSystem(**s3)
        bucket.get("mqscale-test/elastic/stackformer-demo/tb/", str(tmp_path / "tb"), recursive=True)
        sizes = [e.value for e in events(tmp_path / "tb").Scalars("scaling/world_size")]
        assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
        print(f"ELASTIC node removed -> 1 worker trains after {events_at.get('first_step_s')} s; "
              f"world sizes logged {sizes}")
    finally:
        ray.shutdown()
        cluster.shutdown()
