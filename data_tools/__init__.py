"""Dataset tools, ``python -m data_tools.<tool>``: shard_images (images to shards), make_shapes (the
embedded dataset), inspect and verify (what a shard set holds, and whether it is whole)."""
