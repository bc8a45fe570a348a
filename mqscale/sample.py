"""``python -m mqscale.sample``: the command lives in ``mqscale/generate/sample.py``."""
from mqscale.generate.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
