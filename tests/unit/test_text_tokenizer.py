"""Text tokenizers: id 0 is padding and nothing else, vocab_size bounds every id, identities name the mapping."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mqscale.tokenize.text import PAD, ByteTokenizer, HFTokenizer, encode_batch, load_text_tokenizer


def word_level(path, vocab: dict[str, int], unk: str):
    hf = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))
    return hf


def test_hf_token_with_id_0_is_not_padding(tmp_path):
    hf = word_level(tmp_path / "t.json", {"a": 0, "cat": 1, "[UNK]": 2}, "[UNK]")
    tok = load_text_tokenizer(str(tmp_path / "t.json"))
    assert isinstance(tok, HFTokenizer)
    assert hf.encode("a a").ids == [0, 0]          # the JSON's own id for "a" is the padding id
    ids = encode_batch(tok, ["a a", "a", ""], 4)
    assert ids.tolist() == [[1, 1, PAD, PAD], [1, PAD, PAD, PAD], [PAD] * 4]
    assert (ids[0] != PAD).sum() == 2               # the two real tokens stay distinguishable from padding
    assert tok.vocab_size == 4 and int(encode_batch(tok, ["[UNK] zebra cat"], 4).max()) == 3 < tok.vocab_size


def test_hf_vocab_size_bounds_gapped_ids_and_its_own_padding_is_off(tmp_path):
    hf = word_level(tmp_path / "t.json", {"[UNK]": 0, "a": 5, "b": 9}, "[UNK]")
    hf.enable_padding(pad_id=9, pad_token="b", length=6)
    hf.save(str(tmp_path / "t.json"))
    tok = HFTokenizer(str(tmp_path / "t.json"))
    assert tok.vocab_size == 11                     # ids 1..10 after the shift, 0 = padding
    assert encode_batch(tok, ["a", "b a"], 6).tolist() == [[6, 0, 0, 0, 0, 0], [10, 6, 0, 0, 0, 0]]


def test_identities_name_the_mapping(tmp_path):
    word_level(tmp_path / "t.json", {"a": 0, "[UNK]": 1}, "[UNK]")
    word_level(tmp_path / "u.json", {"b": 0, "[UNK]": 1}, "[UNK]")
    t, u = HFTokenizer(str(tmp_path / "t.json")), HFTokenizer(str(tmp_path / "u.json"))
    # v1 ("hf-json:") stored the unshifted ids: shards made with it must not pass as this mapping's
    assert t.identity.startswith("hf-json-v2:") and u.identity.startswith("hf-json-v2:")
    assert t.identity != u.identity and t.identity != ByteTokenizer.identity
    assert load_text_tokenizer("bytes").identity == "bytes-v1"


def test_byte_ids_stay_below_vocab_size_and_pad_with_0():
    tok = ByteTokenizer()
    ids = encode_batch(tok, ["\x00\xff\u20ac", ""], 8)
    assert ids[0, :6].tolist() == [2, 197, 193, 228, 132, 174] and ids[0, 6] == 1 and ids[0, 7] == PAD
    assert ids[1].tolist() == [1] + [PAD] * 7
    assert int(ids.max()) < tok.vocab_size == 258
    assert ids.dtype == np.int32


def test_a_bad_json_is_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="bad.json: not a HuggingFace tokenizers JSON"):
        load_text_tokenizer(str(tmp_path / "bad.json"))
