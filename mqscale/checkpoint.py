"""``python -m mqscale.checkpoint``: the command lives in ``mqscale/train/verify.py``."""
from mqscale.train.verify import main

if __name__ == "__main__":
    raise SystemExit(main())
