"""python -m mqscale.train — distributed Stackformer training (Ray Train + DeepSpeed ZeRO).

Not built yet: issue #6 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("mqscale.train", 6)

if __name__ == "__main__":
    raise SystemExit(main())
