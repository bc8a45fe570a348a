"""Pre-tokenization: exact codes, atomic idempotent reruns, kill + restart, S3, Ray, bad input, flip, text."""
from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.make_shapes import write_shapes
from mqscale.core.errors import InputError
from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.manifest import read_manifest
from mqscale.data.tar import ReadStats, iter_samples
from mqscale.data.tokens import TokenMeta, decode_chunk
from mqscale.models.mqvae.model import MQVAE
from mqscale.tokenize.__main__ import main as tokenize_main
from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml")
    torch.manual_seed(0)
    model = MQVAE(cfg.model).eval()
    TOKENIZER.save(model, cfg, d / "tok")
    return str(d / "tok")


SHAPES = (70, 20)


def run(tok, inp, out, *extra):
    return tokenize_main(["--tokenizer", tok, "--input", inp, "--output", str(out), "--workers", "0",
                          "--no-progress", *extra])


def rows(url: str) -> dict:
    """All decoded rows of a token set, by source key."""
    m = read_manifest(url)
    meta = TokenMeta.from_dict(m.meta)
    out = {}
    for s in m.shards:
        with open(f"{url}/{s.name}", "rb") as f:
            for key, members in iter_samples(f, s.name, ReadStats()):
                if "codes.npy" not in members:
                    continue
                b = decode_chunk(meta, members, ReadStats(), key)
                for i, k in enumerate(members["keys.txt"].decode().split("\n")):
                    out[k] = (b.codes[i], b.positions[i], b.labels[i],
                              None if b.codes_flip is None else (b.codes_flip[i], b.positions_flip[i]),
                              None if b.text is None else b.text[i])
    return out


def images_of(shapes: str) -> dict:
    out = {}
    for p in sorted(Path(shapes).glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png"):
                    out[m.name.split(".")[0]] = np.array(Image.open(io.BytesIO(tf.extractfile(m).read())))
    return out


def shard_hashes(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("tokens-*.tar"))}


def summary_of(stdout: str, out_dir) -> str:
    """The printed summary minus what may differ between runs of one output: its location, how
    many shards this run wrote or kept, and the images/s of this run."""
    text = stdout.replace(str(out_dir), "OUT")
    text = re.sub(r" \(written \d+, kept \d+\)", "", text)
    text = re.sub(r"; [\d.]+ images/s", "", text)
    assert "images in:" in text and "codebook usage:" in text and "mean kept-position map:" in text, stdout
    return text


def png_bytes(size, color=(200, 10, 10)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="PNG")
    return b.getvalue()


def write_images(base: str, shards: list[list[tuple]], classes=("x", "y")) -> None:
    """Image shards from (key, image bytes, .cls bytes or None, .txt bytes or None) samples."""
    from mqscale.data.manifest import IMAGES_FORMAT
    from mqscale.data.tar import TarWriter
    from mqscale.data.writer import ShardJob, shard_name, write_shard_set

    def produce(f, job):
        w = TarWriter(f)
        for key, img, cls, txt in job.items:
            w.add(f"{key}.png", img)
            if cls is not None:
                w.add(f"{key}.cls", cls)
            if txt is not None:
                w.add(f"{key}.txt", txt)
        w.close()
        return len(job.keys)

    jobs = [ShardJob(i, shard_name("images", i), [it[0] for it in items], items) for i, items in enumerate(shards)]
    write_shard_set(base, jobs, produce, fmt=IMAGES_FORMAT, classes=list(classes), progress=False)


@pytest.mark.slow
def test_shards_hold_exactly_what_encode_gives(tok, shapes, tmp_path):
    assert run(tok, shapes, tmp_path / "out") == 0
    m = read_manifest(str(tmp_path / "out"))
    assert [s.n for s in m.shards] == [20, 20, 20, 10]
    assert m.meta["cond"] == "class" and m.meta["grid"] == 8 and m.meta["seq_len"] == 16
    assert m.meta["tokenizer_sha256"] == json.loads((Path(tok) / "config.json").read_text())["weights_sha256"]
    assert m.meta["input_manifest_sha256"] and m.meta["tokenizer_config"]["model"]["resolution"] == 32
    model, _ = TOKENIZER.load(tok)
    imgs = images_of(shapes)
    got = rows(str(tmp_path / "out"))
    keys = sorted(imgs)
    x = torch.from_numpy(np.stack([imgs[k] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1
    enc = model.encode(x)
    for i, k in enumerate(keys):
        assert got[k][0].tolist() == enc.codes[i].tolist()
        assert got[k][1].tolist() == enc.positions[i].tolist()


@pytest.mark.slow
def test_rerun_keeps_every_shard(tok, shapes, tmp_path, capsys):
    run(tok, shapes, tmp_path / "out")
    before = {p.name: (p.stat().st_mtime_ns, h) for p, h in
              zip(sorted((tmp_path / "out").glob("tokens-*.tar")), shard_hashes(tmp_path / "out").values())}
    man = (tmp_path / "out" / "manifest.json").read_bytes()
    time.sleep(0.05)
    capsys.readouterr()
    assert run(tok, shapes, tmp_path / "out") == 0
    assert "written 0, kept 4" in capsys.readouterr().out
    after = {p.name: (p.stat().st_mtime_ns, h) for p, h in
             zip(sorted((tmp_path / "out").glob("tokens-*.tar")), shard_hashes(tmp_path / "out").values())}
    assert after == before and (tmp_path / "out" / "manifest.json").read_bytes() == man


@pytest.mark.integration
def test_killed_run_restarts_to_byte_identical_output(tok, tmp_path, capsys):
    src = tmp_path / "many"
    write_shapes(str(src), 600, resolution=32, shard_size=30, progress=False)
    clean = tmp_path / "clean"
    capsys.readouterr()
    assert run(tok, str(src), clean, "--batch-size", "4") == 0
    clean_summary = summary_of(capsys.readouterr().out, clean)
    assert "images in: 600, sequences out: 600, skipped: none" in clean_summary
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "mqscale.tokenize", "--tokenizer", tok, "--input", str(src),
            "--output", str(out), "--workers", "0", "--no-progress", "--batch-size", "4"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("tokens-*.tar"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = shard_hashes(out)
    assert 2 <= len(partial) < 20 and not (out / "manifest.json").exists()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"kept {len(partial)}" in r.stdout
    assert shard_hashes(out) == shard_hashes(clean)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes().replace(
        str(clean).encode(), str(out).encode())
    # the summary covers the shards kept from the killed run too, so it is the clean run's
    assert summary_of(r.stdout, out) == clean_summary
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "written 0, kept 20" in r.stdout and summary_of(r.stdout, out) == clean_summary


@pytest.mark.slow
def test_bad_inputs_are_counted_and_sizes_follow_the_flag(tok, tmp_path, capsys):
    ok = png_bytes((32, 32))
    write_images(str(tmp_path / "in"), [[
        ("a", ok, b"1", None), ("b", b"not an image", b"1", None), ("c", png_bytes((48, 40)), b"1", None),
        ("d", ok, b"1", b"a caption"), ("e", ok, b"one", None), ("f", ok, b"\xff\xfe", None),
        ("g", ok, b"0", b"caf\xe9 \xff not utf-8"), ("h", ok, b"7", None)]])
    assert run(tok, str(tmp_path / "in"), tmp_path / "o1") == 0
    out = capsys.readouterr().out
    assert "images in: 8, sequences out: 3, skipped: bad class label: 2, no valid class label: 1, " \
           "undecodable: 1, undecodable caption: 1;" in out
    meta = read_manifest(str(tmp_path / "o1")).meta
    assert meta["images_in"] == 8 and meta["skipped"] == {"bad class label": 2, "no valid class label": 1,
                                                          "undecodable": 1, "undecodable caption": 1}
    assert sorted(rows(str(tmp_path / "o1"))) == ["a", "c", "d"]
    assert run(tok, str(tmp_path / "in"), tmp_path / "o2", "--on-size-mismatch", "skip") == 0
    out = capsys.readouterr().out
    assert "sequences out: 2" in out and "size 48x40 (tokenizer: 32): 1" in out
    # labels are not stored without a class condition, so a bad one costs nothing there; captions
    # are carried over under every condition, so an undecodable one is always skipped
    assert run(tok, str(tmp_path / "in"), tmp_path / "o3", "--cond", "none") == 0
    out = capsys.readouterr().out
    assert "images in: 8, sequences out: 6, skipped: undecodable: 1, undecodable caption: 1;" in out
    assert sorted(rows(str(tmp_path / "o3"))) == ["a", "c", "d", "e", "f", "h"]


@pytest.mark.slow
def test_summary_counts_every_shard_of_the_output(tok, tmp_path, capsys):
    """Skips, codebook usage and the kept-position map come from every shard's header, so a rerun
    that rewrites one lost shard (or none) prints what the run that wrote them all printed."""
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (250, 250, 250)]
    write_images(str(tmp_path / "in"), [
        [(f"{s}{i}", png_bytes((32, 32), colors[(s + i) % 4]), b"1", None) for i in range(4)]
        + [(f"{s}bad{j}", b"not an image", b"1", None) for j in range(s + 1)]
        + [(f"{s}lbl", png_bytes((32, 32)), b"x", None)]
        for s in range(3)])
    out = tmp_path / "out"
    capsys.readouterr()
    assert run(tok, str(tmp_path / "in"), out) == 0
    first = capsys.readouterr().out
    clean = summary_of(first, out)
    assert "written 3, kept 0" in first
    assert "images in: 21, sequences out: 12, skipped: bad class label: 3, undecodable: 6\n" in clean
    manifest = (out / "manifest.json").read_bytes()
    (out / "tokens-000001.tar").unlink()
    (out / "manifest.json").unlink()
    assert run(tok, str(tmp_path / "in"), out) == 0
    again = capsys.readouterr().out
    assert "written 1, kept 2" in again and summary_of(again, out) == clean
    assert (out / "manifest.json").read_bytes() == manifest
    assert run(tok, str(tmp_path / "in"), out) == 0
    noop = capsys.readouterr().out
    assert "written 0, kept 3" in noop and summary_of(noop, out) == clean


@pytest.mark.slow
def test_another_batch_size_rewrites_instead_of_mixing(tok, shapes, tmp_path, capsys):
    from mqscale.tokenize.pool import Options
    a = Options(tokenizer="t", input="i", output="o", batch_size=4)
    assert a.fingerprint() != Options(tokenizer="t", input="i", output="o", batch_size=8).fingerprint()
    assert a.fingerprint() == Options(tokenizer="t2", input="i2", output="o2", batch_size=4).fingerprint()
    out = tmp_path / "out"
    assert run(tok, shapes, out, "--batch-size", "4") == 0
    assert run(tok, shapes, out, "--batch-size", "8") == 0
    assert "written 4, kept 0" in capsys.readouterr().out
    with tarfile.open(out / "tokens-000000.tar") as tf:
        head = json.loads(tf.extractfile("header.json").read())
    assert head["options"] == Options(tokenizer="", input="", output="", batch_size=8).fingerprint()
    assert run(tok, shapes, out, "--batch-size", "8") == 0
    assert "written 0, kept 4" in capsys.readouterr().out


@pytest.mark.slow
def test_output_of_another_tokenizer_is_refused(tok, shapes, tmp_path, capsys):
    run(tok, shapes, tmp_path / "out")
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml")
    torch.manual_seed(1)
    TOKENIZER.save(MQVAE(cfg.model).eval(), cfg, tmp_path / "other")
    capsys.readouterr()
    assert run(str(tmp_path / "other"), shapes, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refusing to mix" in err and "tokenizer_sha256" in err
    # and a location with only stray shards (no manifest) of another tokenizer too
    (tmp_path / "out" / "manifest.json").unlink()
    assert run(str(tmp_path / "other"), shapes, tmp_path / "out") == 2
    assert "refusing to mix" in capsys.readouterr().err


@pytest.mark.slow
def test_flip_twins_are_the_mirrors_codes_and_the_loader_picks_one(tok, shapes, tmp_path, capsys):
    assert run(tok, shapes, tmp_path / "out", "--flip") == 0
    assert "images in: 70, sequences out: 140" in capsys.readouterr().out
    model, _ = TOKENIZER.load(tok)
    imgs = images_of(shapes)
    got = rows(str(tmp_path / "out"))
    keys = sorted(imgs)[:8]
    x = torch.from_numpy(np.stack([imgs[k] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1
    mirror = model.encode(torch.flip(x, dims=[3]))
    for i, k in enumerate(keys):
        fc, fp = got[k][3]
        assert fc.tolist() == mirror.codes[i].tolist() and fp.tolist() == mirror.positions[i].tolist()
    loader = StreamingLoader(str(tmp_path / "out"), DataConfig(batch_size=70, num_workers=0, shuffle=False))
    e0, e1 = next(iter(loader))["codes"], None
    loader.set_epoch(1)
    e1 = next(iter(loader))["codes"]
    assert not torch.equal(e0, e1)           # a different twin for some images in another epoch


def test_flip_twins_decode_to_mirrored_images(tmp_path):
    """Checking decode(twin) against reconstruct(flip(x)) would only repeat the code check above, and
    a tokenizer small enough to train in a test does not reconstruct well enough to tell x from its
    mirror by pixels. So the tokenizer here is mirror-equivariant by construction: no downsampling
    (f = 1) and every conv kernel made left-right symmetric; attention, norms, top-k and the codebook
    are blind to the mirror. Its tokens of flip(x) are then exactly those of x with every cell
    mirrored, and it decodes them to exactly flip(decode(x)). On noise images (no ties among cell
    scores, unlike flat backgrounds), the stored twin must be the stored original mirrored cell by
    cell (a check on the shards alone, no encode), and decode to the mirror of the original's
    decode, which is far from the original's decode itself."""
    from mqscale.data.manifest import IMAGES_FORMAT
    from mqscale.data.tar import TarWriter
    from mqscale.data.writer import ShardJob, shard_name, write_shard_set

    cfg = load_tokenizer_config("configs/mqvae/demo.yaml", ["model.ch_mult=[1]"])
    G = cfg.model.grid
    torch.manual_seed(0)
    model = MQVAE(cfg.model).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    TOKENIZER.save(model, cfg, tmp_path / "sym")
    noise = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)

    def png(a):
        b = io.BytesIO()
        Image.fromarray(a).save(b, format="PNG")
        return b.getvalue()

    def produce(f, job):
        w = TarWriter(f)
        for key, (data, ext) in zip(job.keys, job.items):
            w.add(f"{key}.{ext}", data)
        w.close()
        return len(job.keys)

    keys = [f"{i:03d}" for i in range(len(noise))]
    job = ShardJob(0, shard_name("images", 0), keys, [(png(a), "png") for a in noise])
    write_shard_set(str(tmp_path / "in"), [job], produce, fmt=IMAGES_FORMAT, progress=False)
    assert run(str(tmp_path / "sym"), str(tmp_path / "in"), tmp_path / "out", "--flip", "--cond", "none") == 0
    got = rows(str(tmp_path / "out"))
    mirror = lambda p: (p // G) * G + (G - 1 - p % G)  # noqa: E731  (row, col) -> (row, G-1-col)
    for k in keys:
        codes, positions, _, (twin_codes, twin_positions), _ = got[k]
        assert dict(zip(mirror(positions).tolist(), codes.tolist())) == dict(zip(twin_positions.tolist(),
                                                                                 twin_codes.tolist()))
    as_long = lambda i: torch.tensor(np.stack([got[k][i] for k in keys]).astype(np.int64))  # noqa: E731
    twin = lambda i: torch.tensor(np.stack([got[k][3][i] for k in keys]).astype(np.int64))  # noqa: E731
    original, flipped = model.decode(as_long(0), as_long(1)), model.decode(twin(0), twin(1))
    assert (flipped - original.flip(3)).abs().max() < 1e-3
    assert (flipped - original).abs().mean() > 0.05


def test_actor_sizes_fit_every_actor_on_some_node():
    from mqscale.tokenize.pool import actor_sizes
    n = {"CPU": 4.0, "memory": 1e9}
    assert actor_sizes([n], 2) == (2, 2, 0)                        # one machine: its CPUs shared out
    assert actor_sizes([n, n, n], 2) == (2, 4, 0)                   # 12 // 2 = 6 > any node's 4
    assert actor_sizes([{"CPU": 8}, {"CPU": 2}], 2) == (2, 4, 0)    # 5 each would leave one unplaced
    assert actor_sizes([n], 6) == (4, 1, 0)                         # more actors than CPUs: capped
    g = {"CPU": 16.0, "GPU": 2.0}
    assert actor_sizes([g, {"CPU": 64}], 8) == (2, 1, 1)            # one actor per GPU, capped
    assert actor_sizes([g, g], 3) == (3, 1, 1)
    with pytest.raises(InputError, match="no CPU"):
        actor_sizes([{"memory": 1e9}], 1)


def test_address_with_workers_0_is_refused(tok, shapes, tmp_path, capsys):
    assert run(tok, shapes, tmp_path / "out", "--address", "ray://head:10001") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--address" in err and "--workers 0" in err
    assert not (tmp_path / "out").exists()


def test_text_condition_with_byte_ids(tok, shapes, tmp_path):
    assert run(tok, shapes, tmp_path / "out", "--cond", "text", "--text-len", "32") == 0
    m = read_manifest(str(tmp_path / "out"))
    assert m.meta["cond"] == "text" and m.meta["text_tokenizer"] == "bytes-v1" and m.meta["text_len"] == 32
    got = rows(str(tmp_path / "out"))
    caption = Path(shapes)  # the first sample's caption, from its shard
    with tarfile.open(sorted(caption.glob("*.tar"))[0]) as tf:
        cap = tf.extractfile("000000000.txt").read().decode()
    ids = got["000000000"][4]
    expected = [b + 2 for b in cap.encode()][:32]
    assert ids[:len(expected)].tolist() == expected and ids.shape == (32,)
    batch = next(iter(StreamingLoader(str(tmp_path / "out"), DataConfig(batch_size=4, num_workers=0))))
    assert batch["cond"].shape == (4, 32)


@pytest.mark.slow
def test_captions_carry_over_and_hf_tokenizer_json(tok, shapes, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "a", "large", "small", "on", "and", "background", "plain", "textured"]
    hf = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tok.json"))
    assert run(tok, shapes, tmp_path / "out", "--cond", "text", "--text-tokenizer", str(tmp_path / "tok.json"),
               "--text-len", "8") == 0
    m = read_manifest(str(tmp_path / "out"))
    # ids are the JSON's shifted by one (0 stays padding): one more id than the JSON's vocabulary
    assert m.meta["text_tokenizer"].startswith("hf-json-v2:") and m.meta["text_vocab_size"] == len(words) + 1
    with tarfile.open(tmp_path / "out" / "tokens-000000.tar") as tf:
        caps = json.loads(tf.extractfile("000000.captions.json").read())
    got = rows(str(tmp_path / "out"))
    ids = got["000000000"][4]
    hf_ids = hf.encode(caps[0]).ids
    assert ids.tolist() == [i + 1 for i in hf_ids][:8] + [0] * max(0, 8 - len(hf_ids))
    assert caps[0].startswith("a large ")
    assert max(int(r[4].max()) for r in got.values()) == len(words)   # "textured", the last id, is in use
    # every row passes the loader's check against text_vocab_size
    loader = StreamingLoader(str(tmp_path / "out"), DataConfig(batch_size=10, num_workers=0, shuffle=False))
    assert sorted(i for b in loader for i in b["sample_id"][b["mask"]].tolist()) == list(range(70))
    # shards made under the old, unshifted mapping ("hf-json:<sha>") are another tokenizer: refused
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    man["meta"]["text_tokenizer"] = man["meta"]["text_tokenizer"].replace("hf-json-v2:", "hf-json:")
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(man))
    capsys.readouterr()
    assert run(tok, shapes, tmp_path / "out", "--cond", "text", "--text-tokenizer", str(tmp_path / "tok.json"),
               "--text-len", "8") == 2
    err = capsys.readouterr().err
    assert "refusing to mix" in err and "text_tokenizer" in err


@pytest.mark.slow
def test_s3_in_and_out(tok, tmp_path, s3):
    write_shapes("s3://mqscale-test/tok-in", 30, resolution=32, shard_size=10, storage_options=s3, progress=False)
    so = json.dumps(s3)
    assert tokenize_main(["--tokenizer", tok, "--input", "s3://mqscale-test/tok-in", "--output",
                          "s3://mqscale-test/tok-out", "--workers", "0", "--no-progress", "--storage-options", so]) == 0
    m = read_manifest("s3://mqscale-test/tok-out", s3)
    assert m.total == 30
    loader = StreamingLoader("s3://mqscale-test/tok-out", DataConfig(batch_size=10, num_workers=0, storage_options=s3))
    assert sorted(i for b in loader for i in b["sample_id"][b["mask"]].tolist()) == list(range(30))


@pytest.mark.integration
def test_two_ray_workers_write_what_one_writes(tok, shapes, tmp_path):
    outs = []
    for w in ("1", "2"):
        out = tmp_path / f"ray{w}"
        r = subprocess.run([sys.executable, "-m", "mqscale.tokenize", "--tokenizer", tok, "--input", shapes,
                            "--output", str(out), "--workers", w, "--no-progress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        outs.append(shard_hashes(out))
    local = tmp_path / "local"
    run(tok, shapes, local)
    assert outs[0] == outs[1] == shard_hashes(local)
