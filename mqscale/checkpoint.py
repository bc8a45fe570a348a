"""python -m mqscale.checkpoint — verify a training checkpoint.

Not built yet: issue #8 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("mqscale.checkpoint", 8)

if __name__ == "__main__":
    raise SystemExit(main())
