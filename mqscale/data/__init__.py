"""The data layer: the shard formats (images, compact token chunks), manifests, shard-set writing,
and the resumable exactly-once streaming loader over any fsspec URL."""
