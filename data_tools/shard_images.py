"""python -m data_tools.shard_images — dataset tool (shard_images).

Not built yet: issue #3 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("data_tools.shard_images", 3)

if __name__ == "__main__":
    raise SystemExit(main())
