"""python -m mqscale.tokenize — pre-tokenize image shards into masked code/position token shards.

Not built yet: issue #5 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("mqscale.tokenize", 5)

if __name__ == "__main__":
    raise SystemExit(main())
