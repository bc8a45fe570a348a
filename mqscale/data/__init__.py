"""Data layer: token shard format, shard lists, resumable streaming loader (issue #3)."""
