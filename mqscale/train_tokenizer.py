"""python -m mqscale.train_tokenizer — train the MQ-VAE tokenizer under Ray Train.

Not built yet: issue #4 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("mqscale.train_tokenizer", 4)

if __name__ == "__main__":
    raise SystemExit(main())
