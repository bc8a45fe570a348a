"""``python -m mqscale.visualize_masks``: the command lives in ``mqscale/tokenizer/visualize.py``."""
from mqscale.tokenizer.visualize import main

if __name__ == "__main__":
    raise SystemExit(main())
