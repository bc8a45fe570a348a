"""python -m mqscale.sample — generate images from an exported Stackformer and a tokenizer.

Not built yet: issue #7 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("mqscale.sample", 7)

if __name__ == "__main__":
    raise SystemExit(main())
