"""Exported models to sample and evaluate: random weights, the demo's shapes."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from mqscale.models.mqvae.model import MQVAE
from mqscale.models.stackformer.model import Stackformer
from mqscale.tokenize.jobs import Options
from mqscale.tokenize.pool import run as tokenize_run
from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config
from mqscale.train.config import STACKFORMER, load_train_config


def export_tokenizer(path, *overrides: str, seed: int = 0) -> str:
    """A random demo tokenizer (configs/mqvae/demo.yaml, amended) exported to ``path``."""
    torch.manual_seed(seed)
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml", list(overrides))
    TOKENIZER.save(MQVAE(cfg.model).eval(), cfg, path)
    return str(path)


def export_pair(root, *model_overrides: str) -> tuple[str, str]:
    """A random demo-sized tokenizer and a Stackformer shaped to its tokens, both exported."""
    tok = export_tokenizer(root / "tok")
    cfg = load_train_config("configs/demo.yaml", list(model_overrides))
    STACKFORMER.save(Stackformer(cfg.model).eval(), cfg, root / "model")
    return str(root / "model"), tok


def word_tokenizer(path) -> str:
    """A HuggingFace tokenizers JSON with a few words of the shapes' captions."""
    words = ["[PAD]", "a", "large", "small", "on", "and", "background", "plain", "textured"]
    hf = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))
    return str(path)


def text_pair(root, shapes: str, text_tokenizer: str = "bytes") -> tuple[str, str]:
    """A text-conditional pair whose training shards the real tokenize stage made from ``shapes``;
    data.train_url points at them."""
    tokens = root / "tokens"
    model, tok = export_pair(root, "model.cond=text", "model.text_len=8", f"data.train_url={tokens}")
    tokenize_run(Options(tokenizer=tok, input=shapes, output=str(tokens), cond="text", text_len=8,
                         text_tokenizer=text_tokenizer), workers=0, progress=False)
    return model, tok
