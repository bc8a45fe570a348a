"""What the main job needs before it trains: demo token shards and the tokenizer that made them.

Built once under runs/main when missing: the shapes dataset (``make_shapes``), a short training of
the demo tokenizer under Ray Train, its export, and pre-tokenization. A rerun finds them and
skips straight to training.
"""
from __future__ import annotations

import re
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from mqscale.cli import UserError
from mqscale.config import Config
from mqscale.data import fs

TOKENIZER_STEPS = 600


def ensure_demo_data(cfg: Config) -> None:
    tokens, tok_dir = cfg.data.train_url, cfg.logging.tokenizer
    if fs.exists(fs.join(tokens, "manifest.json")) and Path(tok_dir, "config.json").exists():
        return
    root = Path(tokens).parent
    shapes = root / "shapes"
    from data_tools.make_shapes import write_shapes
    print(f"[main] building the demo data under {root} (once)")
    write_shapes(str(shapes), 2000, resolution=32, shard_size=250, progress=False)
    from mqscale import tokenize, train_tokenizer
    buf = StringIO()
    with redirect_stdout(buf):
        rc = train_tokenizer.main(["--config", "configs/mqvae/demo.yaml", f"data.train_url={shapes}",
                                   f"train.max_steps={TOKENIZER_STEPS}", f"checkpoint.dir={root}/tokenizer_runs",
                                   f"logging.tensorboard_dir={root}/tokenizer_runs/tb"])
    found = re.search(r"tokenizer checkpoint: (\S+)", buf.getvalue())
    if rc or not found:
        raise UserError(f"building the demo tokenizer failed:\n{buf.getvalue()[-1500:]}")
    Path(tok_dir).mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(Path(found.group(1)) / name, Path(tok_dir) / name)
    print(f"[main] demo tokenizer ({TOKENIZER_STEPS} steps) -> {tok_dir}")
    with redirect_stdout(buf):
        rc = tokenize.main(["--tokenizer", tok_dir, "--input", str(shapes), "--output", tokens, "--workers", "1",
                            "--no-progress"])
    if rc:
        raise UserError(f"tokenizing the demo data failed:\n{buf.getvalue()[-1500:]}")
    print(f"[main] demo token shards -> {tokens}")
