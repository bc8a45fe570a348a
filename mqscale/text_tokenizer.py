"""Caption -> token ids for text conditioning, with no download: bytes by default, or a local
HuggingFace ``tokenizers`` JSON. Ids are truncated or padded to T (32 in the paper), and every
tokenizer has an identity string that the token shards record, so ids from different tokenizers
are never mixed.
"""
from __future__ import annotations

import hashlib

import numpy as np

PAD = 0


class ByteTokenizer:
    """UTF-8 bytes shifted by 2: 0 is padding, 1 ends the text, 2..257 are bytes."""

    vocab_size = 258
    identity = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")] + [1]


class HFTokenizer:
    """A HuggingFace ``tokenizers`` JSON from a local or fsspec path (needs the ``tokenizers`` package)."""

    def __init__(self, path: str, storage_options: dict | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"{path}: reading a tokenizers JSON needs the 'tokenizers' package "
                             "(pip install tokenizers), or use the default byte tokenizer") from None
        from mqscale.data import fs
        data = fs.read_bytes(path, storage_options)
        self.tok = Tokenizer.from_str(data.decode("utf-8"))
        self.vocab_size = self.tok.get_vocab_size()
        self.identity = f"hf-json:{hashlib.sha256(data).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)


def load_text_tokenizer(spec: str, storage_options: dict | None = None):
    return ByteTokenizer() if spec in ("", "bytes") else HFTokenizer(spec, storage_options)


def encode_batch(tok, texts: list[str], length: int) -> np.ndarray:
    """[n, length] int32 ids, truncated or padded with 0."""
    out = np.full((len(texts), length), PAD, dtype=np.int32)
    for i, t in enumerate(texts):
        ids = tok.encode(t)[:length]
        out[i, : len(ids)] = ids
    return out
