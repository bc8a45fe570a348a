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
from mqscale.config import DataConfig
from mqscale.data.loader import StreamingLoader
from mqscale.data.manifest import read_manifest
from mqscale.data.synthetic import token_set

ROOT = Path(__file__).resolve().parents[1]


def tool(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def images(folder: Path, n: int, size=(40, 30), start=0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.png"
        Image.fromarray(np.full((size[1], size[0], 3), i * 7 % 255, np.uint8)).save(p)
        out.append(p)
    return out


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
            images(src / c, 3, start=10 if c == "dog" else 0)
        inp = src
    else:
        files = images(src, 5)
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
    images(tmp_path / "src", 8)
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        shard_images([str(tmp_path / "src"), str(tmp_path / name), "--seed", seed, "--no-progress"])
    src = lambda n: [json.loads(m.extractfile(x).read())["source"] for m in [tarfile.open(tmp_path / n / "images-000000.tar")]  # noqa: E731
                     for x in m.getmembers() if x.name.endswith(".json")]
    assert src("a") == src("b") != src("c")


def test_rerun_rewrites_nothing(tmp_path):
    images(tmp_path / "src", 7)
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "3", "--resolution", "16", "--no-progress"]
    assert shard_images(args) == 0
    before = shard_hashes(tmp_path / "out")
    time.sleep(0.05)
    r = tool("data_tools.shard_images", *args)
    assert r.returncode == 0 and "written 0, kept 3" in r.stdout
    assert shard_hashes(tmp_path / "out") == before


def test_a_killed_run_leaves_no_partial_shard_and_a_rerun_finishes(tmp_path):
    images(tmp_path / "src", 400, size=(200, 200))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "data_tools.shard_images", str(tmp_path / "src"), str(out),
            "--shard-size", "40", "--resolution", "128", "--image-format", "png", "--no-progress"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("images-*.tar")):
        time.sleep(0.02)
    time.sleep(0.15)   # well inside the next shard's write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
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
    bad = tool("data_tools.verify", str(tmp_path))
    assert bad.returncode == 1
    assert "sha256" in bad.stdout and "shapes-000001.tar:" in bad.stdout
    assert bad.stdout.strip().splitlines()[-1].startswith("FAILED")


def test_inspect_token_shards_shows_usage_and_mask_map(tmp_path):
    token_set(str(tmp_path), [30, 20])
    r = tool("data_tools.inspect", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "tokens shards: 2, samples: 50" in r.stdout
    assert "codebook usage:" in r.stdout and "mean kept-position map:" in r.stdout
    js = json.loads(tool("data_tools.inspect", str(tmp_path), "--json").stdout)
    assert js["length_histogram"] == {"12": 50} and sum(js["class_histogram"].values()) == 50
    assert js["bytes_per_sample"] > 0


def test_missing_input_is_one_line(tmp_path):
    r = tool("data_tools.shard_images", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: input not found"
