"""Fixtures of the fault suite: the demo token shards and tokenizer, once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.training import build_demo_data


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> Path:
    return build_demo_data(tmp_path_factory.mktemp("fault-data"))
