"""``python -m mqscale.plan``: the command lives in ``mqscale/train/plan.py``."""
from mqscale.train.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
