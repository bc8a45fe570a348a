"""The ``data`` section of a run config: which shards to stream, and how.

Token shards for the Stackformer, image shards for the tokenizer; both trainers and the
evaluation read them through the same loader (``loader.py``) with these settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mqscale.core.config import setting


@dataclass
class DataConfig:
    """Shards to stream (token shards for Stackformer, image shards for the tokenizer)."""
    train_url: str = setting("", doc="manifest (or its directory) or a brace pattern, any fsspec URL")
    val_url: str = setting("", doc="validation manifest or pattern")
    kind: Literal["auto", "tokens", "images"] = setting("auto", doc="auto reads it from the manifest")
    batch_size: int = setting(8, ge=1, doc="micro-batch per rank")
    num_workers: int = setting(1, ge=0, doc="DataLoader worker processes per rank")
    mode: Literal["epoch", "resampled"] = setting("epoch", doc="epoch: each sample once per epoch; "
                                            "resampled: endless shards drawn with replacement")
    shuffle: bool = setting(True, doc="seeded shuffle of shard order and within windows")
    shuffle_buffer: int = setting(4096, ge=1, doc="rows per shuffle window")
    seed: int = setting(0, ge=0, doc="data order seed (with the epoch)")
    resolution: int = setting(256, ge=8, doc="images: resize + center-crop to this square size")
    on_shard_error: Literal["fail", "skip"] = setting("fail", doc="a shard unreadable after retries")
    prefetch_factor: int = setting(4, ge=1, doc="batches each worker prepares ahead")
    worker_start: Literal["spawn", "forkserver", "fork"] = setting(
        "spawn", doc="how workers start; fork is unsafe with async filesystems (s3fs)")
    storage_options: dict[str, Any] = setting({}, doc="fsspec options, e.g. {endpoint_url: ..., anon: true}")
