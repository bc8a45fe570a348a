"""data_tools: shard_images inputs, atomic and idempotent reruns, make_shapes, inspect/verify."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.make_shapes import KINDS, make_image, write_shapes
from data_tools.shard_images import main as shard_images
from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.manifest import read_manifest
from mqscale.data.synthetic import token_set
from tests.helpers.shards import image_files, plant_bomb, png_claiming

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def tool(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def shard_hashes(base: Path) -> dict[str, tuple[str, int]]:
    m = read_manifest(str(base))
    return {s.name: (s.sha256, (base / s.name).stat().st_mtime_ns) for s in m.shards}


def test_make_shapes_is_deterministic_and_labelled():
    a, la, ca = make_image(5, 17, 64)
    b, lb, cb = make_image(5, 17, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and (la, ca) == (lb, cb)
    assert KINDS[la] in ca and ca.startswith("a large ")
    c, _, _ = make_image(5, 18, 64)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    arr = np.asarray(a).astype(int)
    assert (np.abs(arr - np.median(arr.reshape(-1, 3), axis=0)).sum(-1) > 60).mean() > 0.05  # an object


def test_make_shapes_cli_and_loader(tmp_path):
    r = tool("data_tools.make_shapes", str(tmp_path / "s"), "--count", "50", "--resolution", "32",
             "--shard-size", "20", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = read_manifest(str(tmp_path / "s"))
    assert [s.n for s in m.shards] == [20, 20, 10] and m.classes == KINDS
    loader = StreamingLoader(str(tmp_path / "s"), DataConfig(batch_size=10, num_workers=0, resolution=32))
    b = next(iter(loader))
    assert b["images"].shape == (10, 32, 32, 3) and b["mask"].all()
    assert all(KINDS[int(lbl)] in cap for lbl, cap in zip(b["labels"], b["captions"]))


@pytest.mark.parametrize("layout", ["folder", "classes", "list", "jsonl"])
def test_shard_images_inputs(tmp_path, layout):
    src = tmp_path / "src"
    if layout == "classes":
        for c in ("dog", "cat"):
            image_files(src / c, 3, start=10 if c == "dog" else 0)
        inp = src
    else:
        files = image_files(src, 5)
        inp = src
        if layout == "list":
            inp = tmp_path / "src" / "list.txt"
            inp.write_text("\n".join(p.name for p in files[:4]) + "\n")
        elif layout == "jsonl":
            inp = tmp_path / "src" / "pairs.jsonl"
            inp.write_text("\n".join(json.dumps({"image": p.name, "caption": f"picture {i}"})
                                     for i, p in enumerate(files)))
    out = tmp_path / "out"
    assert shard_images([str(inp), str(out), "--resolution", "16", "--shard-size", "2", "--no-progress"]) == 0
    m = read_manifest(str(out))
    expected = {"folder": 5, "classes": 6, "list": 4, "jsonl": 5}[layout]
    assert m.total == expected and all(s.n <= 2 for s in m.shards)
    assert m.meta["input_format"] == layout
    batch = next(iter(StreamingLoader(str(out), DataConfig(batch_size=expected, num_workers=0,
                                                                resolution=16, shuffle=False))))
    assert batch["images"].shape == (expected, 16, 16, 3) and batch["mask"].all()
    if layout == "classes":
        assert m.classes == ["cat", "dog"]
        assert sorted(batch["labels"].tolist()) == [0, 0, 0, 1, 1, 1]
    if layout == "jsonl":
        assert sorted(batch["captions"]) == [f"picture {i}" for i in range(5)]


def test_shard_images_order_is_seeded(tmp_path):
    image_files(tmp_path / "src", 8)
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        shard_images([str(tmp_path / "src"), str(tmp_path / name), "--seed", seed, "--no-progress"])
    src = lambda n: [json.loads(m.extractfile(x).read())["source"] for m in [tarfile.open(tmp_path / n / "images-000000.tar")]  # noqa: E731
                     for x in m.getmembers() if x.name.endswith(".json")]
    assert src("a") == src("b") != src("c")


def test_rerun_rewrites_nothing(tmp_path):
    image_files(tmp_path / "src", 7)
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "3", "--resolution", "16", "--no-progress"]
    assert shard_images(args) == 0
    before = shard_hashes(tmp_path / "out")
    time.sleep(0.05)
    r = tool("data_tools.shard_images", *args)
    assert r.returncode == 0 and "written 0, kept 3" in r.stdout
    assert shard_hashes(tmp_path / "out") == before


def test_a_killed_run_leaves_no_partial_shard_and_a_rerun_finishes(tmp_path):
    image_files(tmp_path / "src", 400, size=(200, 200))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "data_tools.shard_images", str(tmp_path / "src"), str(out),
            "--shard-size", "40", "--resolution", "128", "--image-format", "png", "--no-progress"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Freeze the writer (one process: --workers 1) and look: kill it only when it is frozen in the
    # middle of a shard, i.e. a shard's temporary file exists and at least one shard is final.
    # The state seen while it is stopped is exactly the state it dies in.
    in_flight, stopped = [], False
    while proc.poll() is None:
        os.kill(proc.pid, signal.SIGSTOP)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)       # returns once it is really stopped
        stopped = os.WIFSTOPPED(status)
        if not stopped:                                      # it ended on its own (reaped here)
            break
        names = os.listdir(out) if out.exists() else []
        in_flight = [n for n in names if n.startswith(".images-") and ".tar.tmp-" in n]
        if in_flight and any(n.startswith("images-") and n.endswith(".tar") for n in names):
            break
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    if stopped:
        proc.kill()
        proc.wait()
    assert in_flight, "the run finished before it was caught mid-shard; nothing was tested"
    assert set(in_flight) <= set(os.listdir(out))           # the killed write left its temp file
    final = sorted(out.glob("images-*.tar"))
    assert final and not (out / "manifest.json").exists()
    assert len(final) < 10, "the run finished before it was killed; nothing was tested"
    for shard in final:   # every shard under a final name is whole
        with tarfile.open(shard) as tf:
            names = tf.getnames()
        assert len([n for n in names if n.endswith(".png")]) == 40
    r = tool("data_tools.shard_images", *args[3:])
    assert r.returncode == 0, r.stderr
    assert f"kept {len(final)}" in r.stdout
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert tool("data_tools.verify", str(out)).returncode == 0


def test_verify_reports_corruption_and_sha_mismatch(tmp_path):
    write_shapes(str(tmp_path), 30, resolution=16, shard_size=10, progress=False)
    ok = tool("data_tools.verify", str(tmp_path))
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1].startswith("OK: 3 shards, 30 samples")
    shard = tmp_path / "shapes-000001.tar"
    data = bytearray(shard.read_bytes())
    i = data.find(b"\x89PNG", 2000)
    data[i + 20:i + 60] = bytes(40)                        # damage one image in place
    shard.write_bytes(bytes(data))
    with tarfile.open(shard) as tf:                        # the sample whose image that was
        key = next(m.name for m in tf.getmembers() if m.offset_data <= i < m.offset_data + m.size).split(".")[0]
    bad = tool("data_tools.verify", str(tmp_path))
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("BAD shapes-000001.tar: sha256")]
    assert [ln for ln in lines if ln.startswith(f"BAD shapes-000001.tar:{key}: ")]   # the sample, named
    assert lines[-1] == "FAILED: 3 shards, 29 samples decoded, 1 bad samples, 1 sha256 mismatches"
    js = json.loads(tool("data_tools.verify", str(tmp_path), "--json").stdout)
    assert js["bad_samples"] == 1 and js["samples"] == 29 and js["sha256_mismatches"] == 1


def test_verify_counts_a_decompression_bomb_without_a_traceback(tmp_path):
    write_shapes(str(tmp_path), 20, resolution=16, shard_size=10, progress=False)
    key = plant_bomb(tmp_path / "shapes-000001.tar")
    r = tool("data_tools.verify", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"BAD shapes-000001.tar:{key}: ValueError: image over the pixel limit" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("FAILED: 2 shards, 19 samples decoded, 1 bad samples")


@pytest.mark.parametrize("workers", [1, 2])
def test_shard_images_refuses_a_decompression_bomb_in_one_line(tmp_path, workers):
    """With a pool of writers too: the failing shard's error comes out and the others stop (the
    workers' progress ticks, no longer read, must not keep the pool from shutting down)."""
    image_files(tmp_path / "src", 3 if workers == 1 else 120)
    (tmp_path / "src" / "bomb.png").write_bytes(png_claiming(30000, 30000))
    r = tool("data_tools.shard_images", str(tmp_path / "src"), str(tmp_path / "out"), "--resolution", "16",
             "--no-progress", "--workers", str(workers), "--shard-size", "10")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'src' / 'bomb.png'}: not a decodable image")
    assert "pixel limit" in r.stderr and not (tmp_path / "out" / "manifest.json").exists()


def test_verify_counts_a_damaged_tar_header_as_corrupt(tmp_path):
    write_shapes(str(tmp_path), 20, resolution=16, shard_size=10, progress=False)
    shard = tmp_path / "shapes-000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        at = tf.getmember("000000005.png").offset
    data[at + 148:at + 156] = b"9999999\0"                # a wrong header checksum: tarfile stops quietly
    shard.write_bytes(bytes(data))
    r = tool("data_tools.verify", str(tmp_path))
    assert r.returncode == 1
    assert "BAD shapes-000000.tar: corrupt or truncated after 4 samples" in r.stdout


def test_the_progress_bar_moves_per_image(tmp_path):
    image_files(tmp_path / "src", 6)
    env = {**os.environ, "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}   # draw every update
    for workers in ("1", "2"):
        r = subprocess.run([sys.executable, "-m", "data_tools.shard_images", str(tmp_path / "src"),
                            str(tmp_path / f"out{workers}"), "--shard-size", "3", "--workers", workers],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert " 6/6 [" in r.stderr and "images/s" in r.stdout
        if workers == "1":   # in one process every image is one step, not one step per shard
            assert all(f" {k}/6 [" in r.stderr for k in range(1, 7)), r.stderr


def test_inspect_token_shards_shows_usage_and_mask_map(tmp_path):
    token_set(str(tmp_path), [30, 20])
    r = tool("data_tools.inspect", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "tokens shards: 2, samples: 50" in r.stdout
    assert "codebook usage:" in r.stdout and "mean kept-position map:" in r.stdout
    js = json.loads(tool("data_tools.inspect", str(tmp_path), "--json").stdout)
    assert js["length_histogram"] == {"12": 50} and sum(js["class_histogram"].values()) == 50
    assert js["bytes_per_sample"] > 0 and js["length_mismatches"] == 0
    mm = np.array(js["mean_mask_map"])              # [grid, grid]; each sequence keeps 12 of 64
    assert mm.shape == (8, 8) and abs(mm.sum() - 12) < 1e-2 and 0 <= mm.min() <= mm.max() <= 1


def test_missing_input_is_one_line(tmp_path):
    r = tool("data_tools.shard_images", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: input not found"


def test_rerun_with_other_content_options_rewrites_every_shard(tmp_path):
    out = str(tmp_path / "s")
    base = ["data_tools.make_shapes", out, "--count", "30", "--resolution", "16", "--shard-size", "10",
            "--no-progress"]
    assert tool(*base, "--seed", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").glob("shapes-*.tar")}
    r = tool(*base, "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert "written 3, kept 0; seed changed, shards rewritten" in r.stdout
    after = {p.name: p.read_bytes() for p in (tmp_path / "s").glob("shapes-*.tar")}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    m = read_manifest(out)
    assert m.meta["seed"] == 2 and m.meta["resolution"] == 16
    with tarfile.open(tmp_path / "s" / "shapes-000001.tar") as tf:   # the content is what meta says
        first = Image.open(tf.extractfile("000000010.png"))
        assert np.array_equal(np.asarray(first), np.asarray(make_image(2, 10, 16)[0]))
    r = tool(*base, "--seed", "2", "--image-format", "jpg")
    assert "written 3, kept 0; image_format changed" in r.stdout
    r = tool(*base, "--seed", "2", "--image-format", "jpg")
    assert "written 0, kept 3;" in r.stdout and not (tmp_path / "s" / ".pending-manifest.json").exists()


def test_shard_images_rerun_sees_resolution_quality_and_input_changes(tmp_path, capsys):
    image_files(tmp_path / "src", 5)
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "3", "--image-format", "jpg",
            "--no-progress"]
    for extra, expect in ((["--resolution", "16"], "written 2, kept 0;"),
                          (["--resolution", "8"], "kept 0; resolution changed"),
                          (["--resolution", "8", "--quality", "50"], "kept 0; quality changed"),
                          (["--resolution", "8", "--quality", "50"], "written 0, kept 2;")):
        assert shard_images(args + extra) == 0
        assert expect in capsys.readouterr().out
    image_files(tmp_path / "src", 1, start=100)          # a new file shifts what the index keys hold
    assert shard_images(args + ["--resolution", "8", "--quality", "50"]) == 0
    assert "kept 0; inputs_sha256 changed" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "out")).total == 6


class Killed(Exception):
    pass


def _produce_until(f, job):
    """Writes job.items[1]'s bytes, or dies like a killed run on the shard job.items[0] names."""
    stop, tag = job.items
    if job.index == stop:
        raise Killed
    from mqscale.data.tar import TarWriter
    w = TarWriter(f)
    for k in job.keys:
        w.add(f"{k}.txt", tag.encode())
    w.close()
    return len(job.keys)


def test_a_killed_rewrite_never_leaves_old_shards_to_be_trusted(tmp_path):
    from mqscale.data.manifest import IMAGES_FORMAT
    from mqscale.data.writer import ShardJob, write_shard_set

    def run(tag, stop=-1):
        jobs = [ShardJob(i, f"s-{i}.tar", [f"{i}a", f"{i}b"], (stop, tag)) for i in range(3)]
        return write_shard_set(str(tmp_path), jobs, _produce_until, fmt=IMAGES_FORMAT, meta={"tag": tag},
                               progress=False)

    def tags():
        out = []
        for i in range(3):
            p = tmp_path / f"s-{i}.tar"
            out.append(tarfile.open(p).extractfile(f"{i}a.txt").read().decode() if p.exists() else None)
        return out

    run("old")
    with pytest.raises(Killed):
        run("new", stop=1)            # killed after shard 0, with the old set's shards 1, 2 still around
    assert tags() == ["new", None, None] and not (tmp_path / "manifest.json").exists()
    res = run("new")
    assert (res.written, res.kept) == (2, 1) and tags() == ["new"] * 3
    with pytest.raises(Killed):
        run("old", stop=2)
    assert tags() == ["old", "old", None]
    res = run("new")                  # the record says "old": no shard is vouched for
    assert (res.written, res.kept, res.changed) == (3, 0, ["tag"]) and tags() == ["new"] * 3


def test_inspect_measures_row_lengths_and_reports_the_mask_map(tmp_path):
    lengths = [12] * 16
    lengths[3], lengths[7], lengths[9] = 11, 13, 11     # rows a writer would refuse, planted by hand
    js = json.loads(tool("data_tools.inspect", str(_plant_lengths(tmp_path / "bad", lengths)), "--json").stdout)
    assert js["length_histogram"] == {"11": 2, "12": 13, "13": 1} and js["length_mismatches"] == 3
    assert js["samples"] == 13 and np.array(js["mean_mask_map"]).shape == (8, 8)
    r = tool("data_tools.inspect", str(tmp_path / "bad"))
    assert "3 rows not of length 12" in r.stdout


def _plant_lengths(base: Path, lengths: list[int]) -> Path:
    from mqscale.data.manifest import TOKENS_FORMAT
    from mqscale.data.synthetic import META
    from mqscale.data.writer import ShardJob, write_shard_set

    write_shard_set(str(base), [ShardJob(0, "tokens-000000.tar", ["header", "000000"], lengths, n=len(lengths))],
                    _produce_lengths, fmt=TOKENS_FORMAT, meta=META.to_dict(), progress=False)
    return base


def _produce_lengths(f, job):
    from mqscale.data.synthetic import META
    from mqscale.data.tar import TarWriter
    from mqscale.data.tokens import header_bytes, npy_bytes

    g = np.random.default_rng(0)
    n = len(job.items)
    grid = np.zeros((n, META.n_positions), bool)
    for i, L in enumerate(job.items):
        grid[i, np.sort(g.permutation(META.n_positions)[:L])] = True
    w = TarWriter(f)
    w.add("header.json", header_bytes(META, 0, n, 16))
    w.add("000000.codes.npy", npy_bytes(g.integers(0, META.codebook_size, (n, META.seq_len)).astype(np.int16)))
    w.add("000000.posbits.npy", npy_bytes(np.packbits(grid, axis=1)))
    w.add("000000.labels.npy", npy_bytes(np.zeros(n, np.int32)))
    w.close()
    return n


def test_shard_mb_cuts_shards_by_size(tmp_path):
    """--shard-mb: shards hold as many samples as fit the target, so their bytes, not their sample
    counts, follow the target: twice the target, about twice the samples per shard."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(90):                       # noise: every PNG about the same (incompressible) size
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(src / f"n{i:03d}.png")
    sample_bytes = np.mean([p.stat().st_size for p in src.iterdir()])
    counts = {}
    for mb in (0.1, 0.2):
        out = tmp_path / f"out{mb}"
        assert shard_images([str(src), str(out), "--shard-mb", str(mb), "--no-progress"]) == 0
        m = read_manifest(str(out))
        sizes = [(out / s.name).stat().st_size for s in m.shards]
        n = [s.n for s in m.shards]
        assert sum(n) == 90 and len(n) >= 3
        assert len(set(n[:-1])) == 1 and n[-1] <= n[0]            # equal shards, the rest in the last
        target = mb * 1e6
        for size in sizes[:-1]:
            assert size <= target + 10240                        # at most one tar record over
            assert size + 2 * (sample_bytes + 2048) > target     # and full: no room for two more samples
        counts[mb] = n[0]
    assert 1.8 <= counts[0.2] / counts[0.1] <= 2.2, counts
