"""A local run starts a Ray of its own, even on a machine where someone's `ray start` cluster is up.

ray.init() with no address joins the cluster named in <ray temp dir>/ray_current_cluster (the last
`ray start` on the machine) and then refuses the num_cpus a local run passes. A CI machine that had
left such a cluster up failed every training test that way.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROBE = """
import ray
from mqscale.core.ray import start_ray, stop_ray
assert start_ray(cpus=3)
print("CPUS", ray.cluster_resources()["CPU"])
stop_ray()
"""


def test_local_ray_ignores_the_machines_last_ray_start_cluster():
    # a short temp dir of our own (Ray's socket paths must stay under the AF_UNIX limit)
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="rt") as tmp:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:6399")   # a `ray start` Ray would join
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    cpus = float(r.stdout.split("CPUS")[1].split()[0])
    assert cpus >= 3, r.stdout       # a cluster sized by this run, not someone else's
