"""Caption -> token ids for text conditioning, with no download: bytes by default, or a local
HuggingFace ``tokenizers`` JSON. Ids are truncated or padded to T (32 in the paper), and every
tokenizer has an identity string that the token shards record, so ids from different tokenizers
are never mixed.

Id 0 is padding for every tokenizer, so no real token may have it: the byte tokenizer shifts bytes
by 2 and the HuggingFace one shifts its ids by 1. ``vocab_size`` counts the padding id too (it is
one more than the largest id a tokenizer can emit); the shards record it as ``text_vocab_size`` and
the model's text embedding (``model.text_vocab_size``) must be at least that large. The identity
names the id mapping as well as the tokenizer, so shards made under another mapping are refused.
"""
from __future__ import annotations

import hashlib

import numpy as np
from tokenizers import Tokenizer

from mqscale.core import storage
from mqscale.core.errors import InputError

PAD = 0


class ByteTokenizer:
    """UTF-8 bytes shifted by 2: 0 is padding, 1 ends the text, 2..257 are bytes."""

    vocab_size = 258
    identity = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")] + [1]


class HFTokenizer:
    """A HuggingFace ``tokenizers`` JSON from a local or fsspec path.

    Its ids are shifted by 1 (id i is stored as i + 1) so that none collides with padding, and the
    JSON's own padding is turned off (padding here is always our PAD, up to T). Identity
    ``hf-json-v2:<sha256 of the JSON>``; v1 (``hf-json:``) stored the unshifted ids."""

    SHIFT = 1

    def __init__(self, path: str, storage_options: dict | None = None):
        data = storage.read_bytes(path, storage_options)
        try:
            self.tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own Exception subclass on a bad JSON
            raise InputError(f"{path}: not a HuggingFace tokenizers JSON ({str(e).splitlines()[0][:200]})") from None
        self.tok.no_padding()
        ids = self.tok.get_vocab(with_added_tokens=True).values()
        # vocab ids need not be contiguous: size the table by the largest one, not by the count
        self.vocab_size = max(ids, default=-1) + 1 + self.SHIFT
        self.identity = f"hf-json-v2:{hashlib.sha256(data).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return [i + self.SHIFT for i in self.tok.encode(text).ids]


def load_text_tokenizer(spec: str, storage_options: dict | None = None):
    return ByteTokenizer() if spec in ("", "bytes") else HFTokenizer(spec, storage_options)


def encode_batch(tok, texts: list[str], length: int) -> np.ndarray:
    """[n, length] int32 ids, truncated or padded with PAD (0)."""
    out = np.full((len(texts), length), PAD, dtype=np.int32)
    for i, t in enumerate(texts):
        ids = tok.encode(t)[:length]
        out[i, : len(ids)] = ids
    return out
