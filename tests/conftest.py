"""Fixtures every test may use, and the markers that split the suite.

``make test-unit`` leaves out the tests marked ``integration`` (they start Ray, a subprocess or a
DeepSpeed process group: every module under tests/integration and tests/fault is, by its
``pytestmark``, and a few tests elsewhere are, one by one) and ``slow`` (a unit test that
computes for long), so the unit run is fast and needs none of them. ``make test`` runs all.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools.make_shapes import write_shapes
from mqscale.core.loopback_s3 import loopback_s3

INTEGRATION_DIRS = ("integration", "fault")


def pytest_collection_modifyitems(config, items):
    """Every test under tests/integration or tests/fault must carry the integration marker (and
    nothing elsewhere may start Ray or a subprocess unmarked): a misfiled test fails loudly."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        in_integration_dir = any(d in parts for d in INTEGRATION_DIRS)
        if in_integration_dir and "integration" not in item.keywords:
            raise pytest.UsageError(f"{item.nodeid}: tests under tests/integration and tests/fault are marked "
                                    "integration (pytestmark = pytest.mark.integration)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on loopback (moto's ThreadedMotoServer), as s3fs's own test suite uses."""
    with loopback_s3("mqscale-test") as opts:
        yield opts


@pytest.fixture(scope="module")
def shapes(request, tmp_path_factory) -> str:
    """Image shards of the embedded shapes dataset, 32 px, made once per module: the module's
    ``SHAPES = (images, images per shard)`` says how many (default 48 in shards of 24)."""
    count, per_shard = getattr(request.module, "SHAPES", (48, 24))
    d = str(tmp_path_factory.mktemp("shapes"))
    write_shapes(d, count, resolution=32, shard_size=per_shard, progress=False)
    return d
