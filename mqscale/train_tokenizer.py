"""``python -m mqscale.train_tokenizer``: the command lives in ``mqscale/tokenizer/__main__.py``."""
from mqscale.tokenizer.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
