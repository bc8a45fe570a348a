"""Bad data never stops or fools the loader: truncation, pickles, invalid tokens, lost shards."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import pickle
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from mqscale.core import storage
from mqscale.core.errors import ShardReadError
from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.synthetic import META, token_set
from mqscale.data.tokens import TokenMeta, npy_bytes

COUNTS = [40, 40, 40]


def cfg(**kw):
    base = dict(batch_size=8, num_workers=0, shuffle_buffer=16, seed=1)
    base.update(kw)
    return DataConfig(**base)


def valid_ids(loader):
    return [i for b in loader for i in b["sample_id"][b["mask"]].tolist()]


def rows_before_cut(data: bytes, cut: int, chunk: int = 16) -> int:
    """Rows of a token shard that survive a cut at byte ``cut``, by the reader's rule: a sample
    (header or chunk) is delivered once the next sample's first member has been read whole; the
    last one needs the end-of-archive marker, which a cut shard lacks."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    first_end: dict[str, int] = {}
    for m in members:
        first_end.setdefault(m.name.split(".")[0], m.offset_data + m.size)
    keys = list(first_end)
    delivered = [k for k, nxt in zip(keys, keys[1:]) if first_end[nxt] <= cut]
    return len(delivered[1:]) * chunk if delivered else 0   # keys[0] is the header; chunks 0, 1 are full


def _cuts(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        m = {x.name: x for x in tf.getmembers()}
    return {
        "half": len(data) // 2,
        "inside chunk 1's first member": m["000001.codes.npy"].offset_data + 10,
        "inside chunk 1's second member": m["000001.posbits.npy"].offset_data + 10,
        "at the member boundary before chunk 2": m["000002.codes.npy"].offset,
    }


@pytest.mark.parametrize("where", ["half", "inside chunk 1's first member", "inside chunk 1's second member",
                                   "at the member boundary before chunk 2"])
def test_truncated_shard_is_counted_and_the_rest_arrives(tmp_path, where):
    token_set(str(tmp_path), COUNTS)                      # 40 rows per shard in chunks of 16, 16, 8
    shard = tmp_path / "tokens-000001.tar"
    data = shard.read_bytes()
    cut = _cuts(data)[where]
    kept = rows_before_cut(data, cut)
    assert kept == {"half": 32, "inside chunk 1's first member": 0, "inside chunk 1's second member": 16,
                    "at the member boundary before chunk 2": 16}[where]
    shard.write_bytes(data[:cut])
    loader = StreamingLoader(str(tmp_path), cfg())
    ids = valid_ids(loader)
    st = loader.stats()
    assert st["corrupt_shards"] == 1
    assert 120 - len(ids) == 40 - kept == st["missing_samples"]
    # the whole first and last shards, and exactly the leading rows of the cut one
    assert sorted(ids) == list(range(0, 40 + kept)) + list(range(80, 120))
    assert any("tokens-000001.tar" in e for e in loader.events)


def test_bad_shards_are_logged_by_name_once(tmp_path, caplog):
    token_set(str(tmp_path), COUNTS)
    shard = tmp_path / "tokens-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])          # truncated
    members = members_of(tmp_path / "tokens-000002.tar")
    with tarfile.open(tmp_path / "tokens-000002.tar", "w") as tf:
        for name, data in members:
            _add(tf, name, data)
            if name.endswith(".codes.npy"):               # a pickle in every chunk: one warning
                _add(tf, name.replace("codes.npy", "evil.pkl"), b"not unpickled")
    with caplog.at_level("WARNING", logger="mqscale.data"):
        list(StreamingLoader(str(tmp_path), cfg(shuffle=False)))
    warned = [r.getMessage() for r in caplog.records if r.name == "mqscale.data" and r.levelname == "WARNING"]
    corrupt = [m for m in warned if "tokens-000001.tar" in m and "corrupt or truncated" in m]
    refused = [m for m in warned if "tokens-000002.tar" in m and "refused" in m]
    assert len(corrupt) == 1 and str(tmp_path) in corrupt[0]
    assert len(refused) == 1 and "evil.pkl" in refused[0]
    assert not [m for m in warned if "tokens-000000.tar" in m]


class _Bomb:
    """Unpickling this creates a file: proof that something unpickled a member."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def members_of(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_pickle_members_are_refused_never_executed(tmp_path):
    token_set(str(tmp_path), COUNTS)
    marker = tmp_path / "PWNED"
    shard = tmp_path / "tokens-000002.tar"
    members = members_of(shard)
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            _add(tf, name, data)
            if name.endswith("000000.codes.npy"):
                for ext in ("pyd", "pkl", "pickle", "pth"):
                    _add(tf, f"000000.evil.{ext}", pickle.dumps(_Bomb(str(marker))))
    loader = StreamingLoader(str(tmp_path), cfg())
    ids = valid_ids(loader)
    assert not marker.exists()
    assert loader.stats()["refused_members"] == 4
    assert sorted(ids) == list(range(120))  # the shard's sequences still arrive


def test_npy_with_pickled_objects_is_not_loaded(tmp_path):
    token_set(str(tmp_path), [20])
    marker = tmp_path / "PWNED2"
    shard = tmp_path / "tokens-000000.tar"
    members = members_of(shard)
    buf = io.BytesIO()
    np.save(buf, np.array([_Bomb(str(marker))], dtype=object), allow_pickle=True)
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            _add(tf, name, buf.getvalue() if name == "000000.codes.npy" else data)
    loader = StreamingLoader(str(tmp_path), cfg())
    ids = valid_ids(loader)
    assert not marker.exists()
    assert loader.stats()["undecodable"] == 1
    assert sorted(ids) == list(range(16, 20))     # chunk 0 (16 rows) lost, chunk 1 kept


def test_invalid_token_samples_are_skipped_and_counted(tmp_path):
    token_set(str(tmp_path), [32], chunk=16)
    shard = tmp_path / "tokens-000000.tar"
    members = members_of(shard)
    g = np.random.default_rng(0)
    codes = g.integers(0, META.codebook_size, (16, META.seq_len))
    codes[2, 5] = META.codebook_size + 3                      # code out of range
    pos = np.stack([np.sort(g.permutation(64)[: META.seq_len]) for _ in range(16)])
    pos[4] = pos[4][::-1]                                     # descending
    pos[6, 3] = pos[6, 2]                                     # repeated position
    pos[8, -1] = 64                                           # off the grid
    labels = np.arange(16) % META.n_classes
    labels[10] = 99                                           # class out of range
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            if name.startswith("000001."):
                if name.endswith("codes.npy"):
                    _add(tf, "000001.codes.npy", npy_bytes(codes.astype(np.int16)))
                    _add(tf, "000001.positions.npy", npy_bytes(pos.astype(np.int16)))
                    _add(tf, "000001.labels.npy", npy_bytes(labels.astype(np.int32)))
                continue
            _add(tf, name, data)
    loader = StreamingLoader(str(tmp_path), cfg(shuffle=False))
    batches = list(loader)
    ids = [i for b in batches for i in b["sample_id"][b["mask"]].tolist()]
    assert loader.stats()["invalid_samples"] == 5
    assert sorted(ids) == [i for i in range(32) if i not in {18, 20, 22, 24, 26}]
    for b in batches:   # every delivered row is valid
        m = b["mask"]
        assert (b["codes"][m] < META.codebook_size).all()
        assert (b["positions"][m].diff(dim=1) > 0).all()


def test_unreadable_shard_fails_or_is_skipped_per_config(tmp_path):
    token_set(str(tmp_path), COUNTS)
    (tmp_path / "tokens-000000.tar").unlink()
    with pytest.raises(ShardReadError, match="tokens-000000.tar"):
        list(StreamingLoader(str(tmp_path), cfg()))
    loader = StreamingLoader(str(tmp_path), cfg(on_shard_error="skip"))
    ids = valid_ids(loader)
    assert sorted(ids) == list(range(40, 120))
    assert loader.stats()["unreadable_shards"] == 1


def test_shard_from_another_tokenizer_is_skipped(tmp_path):
    token_set(str(tmp_path / "a"), [20, 20])
    other = TokenMeta(**{**META.to_dict(), "tokenizer_sha256": "cd" * 32})
    token_set(str(tmp_path / "b"), [20, 20], meta=other)
    (tmp_path / "b" / "tokens-000001.tar").replace(tmp_path / "a" / "tokens-000001.tar")
    loader = StreamingLoader(str(tmp_path / "a"), cfg())
    assert sorted(valid_ids(loader)) == list(range(20))
    assert loader.stats()["corrupt_shards"] == 1
    assert any("tokenizer_sha256" in e for e in loader.events)


def test_pipe_urls_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pipe: URLs are refused"):
        StreamingLoader("pipe:curl http://x/{0..3}.tar", cfg())
    import webdataset as wds
    storage.register_webdataset_opener()
    with pytest.raises(ValueError, match="refused"):
        from webdataset.gopen import gopen
        gopen(f"pipe:touch {tmp_path}/pwned")
    assert not (tmp_path / "pwned").exists()
    assert wds is not None


@pytest.mark.integration
def test_token_shard_is_plain_webdataset_and_tar(tmp_path):
    token_set(str(tmp_path), [600], chunk=256)
    shard = tmp_path / "tokens-000000.tar"
    listing = subprocess.run(["tar", "-tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["header.json", "000000.codes.npy", "000000.posbits.npy"]
    import webdataset as wds
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["header", "000000", "000001", "000002"]
    codes = np.load(io.BytesIO(samples[1]["codes.npy"]), allow_pickle=False)
    assert codes.shape == (256, META.seq_len) and codes.dtype == np.int16


def test_token_shard_meets_the_size_target(tmp_path):
    """At most 1.25x the raw payload (2 bytes per code + 2 per position) for L=256, chunks of 256."""
    meta = TokenMeta(grid=32, codebook_size=16384, seq_len=256, cond="class", n_classes=1000,
                     tokenizer_sha256="ab" * 32)
    n = 1024
    token_set(str(tmp_path), [n], meta=meta, chunk=256)
    per_sequence = (tmp_path / "tokens-000000.tar").stat().st_size / n
    assert per_sequence <= 1.25 * 4 * meta.seq_len, per_sequence


def _rewrite(shard: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            _add(tf, name, data)


@pytest.mark.parametrize("order", [["000001", "000000", "000002"], ["000000", "000002"]])
def test_chunks_out_of_order_or_missing_are_counted_never_lost_silently(tmp_path, order):
    token_set(str(tmp_path), COUNTS)                      # chunks of 16, 16, 8 rows
    shard = tmp_path / "tokens-000001.tar"
    by_key: dict[str, list] = {}
    for name, data in members_of(shard):
        by_key.setdefault(name.split(".")[0], []).append((name, data))
    _rewrite(shard, by_key["header"] + [m for k in order for m in by_key[k]])
    loader = StreamingLoader(str(tmp_path), cfg())
    ids = valid_ids(loader)
    st = loader.stats()
    kept = 16 if order[0] == "000000" else 0              # the chunks before the first one out of place
    assert len(ids) == len(set(ids))                      # no row given twice
    assert sorted(ids) == list(range(40 + kept)) + list(range(80, 120))
    assert st["corrupt_shards"] == 1 and st["missing_samples"] == 40 - kept
    assert any("tokens-000001.tar" in e and "out of order or missing" in e for e in loader.events)


def test_a_damaged_member_header_mid_shard_is_counted_corrupt(tmp_path):
    token_set(str(tmp_path), COUNTS)
    shard = tmp_path / "tokens-000001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        at = tf.getmember("000001.posbits.npy").offset
    data[at + 148:at + 156] = b"9999999\0"                # a wrong header checksum: tarfile stops quietly
    shard.write_bytes(bytes(data))
    loader = StreamingLoader(str(tmp_path), cfg())
    ids = valid_ids(loader)
    st = loader.stats()
    assert st["corrupt_shards"] == 1 and st["missing_samples"] == 24
    assert sorted(ids) == list(range(56)) + list(range(80, 120))   # chunk 0 of the shard, nothing after
    assert any("tokens-000001.tar" in e and "damaged member header" in e for e in loader.events)


def test_bytes_after_the_end_of_archive_are_counted_corrupt(tmp_path):
    token_set(str(tmp_path), [20])
    shard = tmp_path / "tokens-000000.tar"
    shard.write_bytes(shard.read_bytes() + b"\x01" * 512 + bytes(1024))   # data after the end, zeros after it
    loader = StreamingLoader(str(tmp_path), cfg())
    assert sorted(valid_ids(loader)) == list(range(16))  # the last chunk is held back, then dropped
    assert loader.stats()["corrupt_shards"] == 1


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gz", "bz2", "xz"])
def test_compressed_shards_are_read_whole(tmp_path, compress):
    token_set(str(tmp_path), COUNTS)
    ext = {gzip.compress: "gz", bz2.compress: "bz2", lzma.compress: "xz"}[compress]
    for i in range(3):
        tar = tmp_path / f"tokens-{i:06d}.tar"
        (tmp_path / f"{tar.name}.{ext}").write_bytes(compress(tar.read_bytes()))
    loader = StreamingLoader(str(tmp_path / f"tokens-{{000000..000002}}.tar.{ext}"), cfg())
    assert sorted(valid_ids(loader)) == list(range(120))
    assert {k: v for k, v in loader.stats().items() if v and k != "samples"} == {}


def test_a_truncated_gzip_shard_is_counted_and_the_rest_arrives(tmp_path):
    token_set(str(tmp_path), [200, 200, 200])
    m = json.loads((tmp_path / "manifest.json").read_text())
    for i, info in enumerate(m["shards"]):             # the same set, gzipped, shard 1 cut in half
        gz = gzip.compress((tmp_path / info["name"]).read_bytes())
        gz = gz[: len(gz) // 2] if i == 1 else gz
        info["name"] += ".gz"
        (tmp_path / info["name"]).write_bytes(gz)
        info["bytes"], info["sha256"] = len(gz), hashlib.sha256(gz).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    loader = StreamingLoader(str(tmp_path), cfg())
    ids = sorted(valid_ids(loader))
    st = loader.stats()
    assert st["corrupt_shards"] == 1 and 0 < st["missing_samples"] < 200
    kept = 200 - st["missing_samples"]                  # a prefix of the cut shard, whole chunks of 16
    assert kept % 16 == 0 and ids == list(range(200 + kept)) + list(range(400, 600))


def _png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def plant_bomb(shard: Path, w: int = 30000, h: int = 30000) -> str:
    """Replace the shard's first image by a decompression bomb; returns its sample key."""
    members = members_of(shard)
    key = next(n for n, _ in members if n.endswith(".png")).split(".")[0]
    _rewrite(shard, [(n, _png_claiming(w, h) if n == f"{key}.png" else d) for n, d in members])
    return key


def test_a_decompression_bomb_is_undecodable_and_counted(tmp_path):
    from data_tools.make_shapes import write_shapes
    write_shapes(str(tmp_path), 30, resolution=16, shard_size=10, progress=False)
    plant_bomb(tmp_path / "shapes-000001.tar")
    loader = StreamingLoader(str(tmp_path), cfg(resolution=16))
    ids = valid_ids(loader)
    assert sorted(ids) == [i for i in range(30) if i != 10]
    assert loader.stats()["undecodable"] == 1
    assert any("over the pixel limit" in e for e in loader.events)


@pytest.mark.parametrize("w, h", [(30000, 30000), (10000, 10000)])
def test_image_size_is_checked_before_decoding(w, h):
    from mqscale.data.images import load_rgb
    with pytest.raises(ValueError, match="pixel limit"):
        load_rgb(_png_claiming(w, h))


def _npy_claiming(shape: tuple, dtype=np.int16, payload: bytes = b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + payload


def test_an_npy_header_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    token_set(str(tmp_path), [32], chunk=16)
    shard = tmp_path / "tokens-000000.tar"
    bomb = _npy_claiming((4_000_000_000, 256))
    _rewrite(shard, [(n, bomb if n == "000000.codes.npy" else d) for n, d in members_of(shard)])
    loader = StreamingLoader(str(tmp_path), cfg())
    assert sorted(valid_ids(loader)) == list(range(16, 32))    # chunk 0 refused, chunk 1 kept
    assert loader.stats()["undecodable"] == 1
    assert any("000000: undecodable chunk" in e and "header claims shape" in e for e in loader.events)


def test_npy_load_checks_the_header_against_the_bytes():
    from mqscale.data.tokens import npy_load
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert np.array_equal(npy_load(npy_bytes(a)), a) and np.array_equal(npy_load(npy_bytes(a.T)), a.T)
    with pytest.raises(ValueError, match="header claims shape"):
        npy_load(npy_bytes(a)[:-2])                            # cut short
    with pytest.raises(ValueError, match="header claims shape"):
        npy_load(_npy_claiming((-1, 4)))
    with pytest.raises(ValueError, match="not an integer array"):
        npy_load(_npy_claiming((2,), dtype=object))
    with pytest.raises(ValueError, match="not an npy array"):
        npy_load(b"\x93NUMPY\x01\x00garbage")


@pytest.mark.parametrize("url", ["PIPE:touch {d}/pwned", "Pipe:touch {d}/pwned", " pipe:touch {d}/pwned",
                                 "pi\tpe:touch {d}/pwned", "scp://host/{d}/x.tar", "AIS://b/x.tar",
                                 "ftps://host/x.tar", "htgs://b/x.tar"])
def test_command_urls_are_refused_in_any_spelling(tmp_path, url):
    url = url.format(d=tmp_path)
    with pytest.raises(ValueError, match="URLs are refused"):
        storage.check_url(url)
    with pytest.raises(ValueError, match="refused"):
        StreamingLoader(url, cfg())
    storage.register_webdataset_opener()
    from webdataset.gopen import gopen
    with pytest.raises(ValueError, match="refused"):
        gopen(url)
    assert not (tmp_path / "pwned").exists()


def test_fsspec_urls_pass_the_check(tmp_path):
    for url in ("s3://bucket/a.tar", "memory://x/a.tar", str(tmp_path / "a:b.tar"), "file:///tmp/x.tar",
                "https://host/pipe:x.tar", "shards/pipeline.tar"):
        assert storage.check_url(url) == url
    storage.register_webdataset_opener()
    from webdataset.gopen import gopen_schemes
    assert gopen_schemes["s3"] is gopen_schemes["http"] is gopen_schemes["sftp"]   # all through fsspec
