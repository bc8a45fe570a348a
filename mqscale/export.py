"""``python -m mqscale.export``: the command lives in ``mqscale/train/export.py``."""
from mqscale.train.export import main

if __name__ == "__main__":
    raise SystemExit(main())
