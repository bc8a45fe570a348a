"""python -m data_tools.make_shapes OUT_URL [--count N --resolution R --seed S]: the embedded dataset.

Procedurally drawn images, each generated from (seed, index) alone, so any count, any resolution
and any subset is reproducible. Every image has one large object whose kind is the class label,
sometimes a smaller distractor, on a plain or lightly textured background, plus a caption such as
"a large red star and a small blue ring on a plain gray background". Objects on quiet backgrounds
give an MQ-VAE's importance mask something to find. Output: image shards + manifest.json.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
from PIL import Image, ImageDraw

from mqscale.core.cli import add_storage_options_arg, guarded
from mqscale.core.errors import InputError
from mqscale.data.images import encode_image
from mqscale.data.manifest import IMAGES_FORMAT
from mqscale.data.tar import TarWriter
from mqscale.data.writer import ShardJob, progress_tick, shard_name, write_shard_set

KINDS = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "ellipse", "hexagon", "bar"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "orange": (245, 140, 30), "purple": (140, 60, 190), "cyan": (40, 200, 210), "pink": (240, 120, 180),
          "white": (245, 245, 245), "black": (20, 20, 20)}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (225, 215, 190), "navy": (30, 35, 80),
               "light blue": (190, 215, 240), "dark green": (30, 70, 45)}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "star":
        pts = [(r if i % 2 == 0 else 0.45 * r, angle + i * math.pi / 5) for i in range(10)]
    else:
        n = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6}[kind]
        if kind in ("square", "diamond"):  # told apart by orientation alone, so never rotated
            angle = math.pi / 4 if kind == "square" else 0.0
        pts = [(r, angle + 2 * math.pi * i / n) for i in range(n)]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for d, a in pts]


def draw_object(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, color) -> None:
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "ring":
        w = max(2, int(r * 0.35))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=w)
    elif kind == "ellipse":
        d.ellipse([cx - r, cy - 0.55 * r, cx + r, cy + 0.55 * r], fill=color)
    elif kind in ("cross", "bar"):
        t = 0.3 * r
        c, s = math.cos(angle), math.sin(angle)
        arms = [(1, 0)] if kind == "bar" else [(1, 0), (0, 1)]
        for ax, ay in arms:
            ux, uy = ax * c - ay * s, ax * s + ay * c
            vx, vy = -uy, ux
            d.polygon([(cx + ux * r + vx * t, cy + uy * r + vy * t), (cx + ux * r - vx * t, cy + uy * r - vy * t),
                       (cx - ux * r - vx * t, cy - uy * r - vy * t), (cx - ux * r + vx * t, cy - uy * r + vy * t)],
                      fill=color)
    else:
        d.polygon(_polygon(kind, cx, cy, r, angle), fill=color)


VARIETIES = ("full", "demo")


def make_image(seed: int, index: int, resolution: int, variety: str = "full") -> tuple[Image.Image, int, str]:
    """(image, class label, caption), a pure function of (seed, index, resolution, variety).

    ``full``: the object anywhere, any size from 18% to 30% of the side, any rotation, a textured
    background 40% of the time and a distractor half the time. ``demo`` (what the 15-minute demo
    learns): the same ten shapes, colours and backgrounds, but the object within 12% of the centre,
    24-34% of the side, rotated by at most 0.3 rad, on a plain or gradient background, alone. The
    class is still only in the shape: colour and background are drawn apart from it."""
    demo = variety == "demo"
    g = np.random.default_rng([seed, index])
    R = resolution
    bg_name = list(BACKGROUNDS)[g.integers(len(BACKGROUNDS))]
    bg = np.array(BACKGROUNDS[bg_name], dtype=np.float32)
    textured = bool(g.random() < 0.4)
    arr = np.broadcast_to(bg, (R, R, 3)).copy()
    if textured:  # light noise plus a soft gradient
        arr += g.normal(0, 6, (R, R, 1)).astype(np.float32) * (0.0 if demo else 1.0)
        arr += np.linspace(-12, 12, R, dtype=np.float32)[None, :, None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    label = int(g.integers(len(KINDS)))
    names = [c for c in COLORS if np.abs(np.array(COLORS[c]) - bg).sum() > 150]
    main_color = names[g.integers(len(names))]
    if demo:
        r = R * g.uniform(0.24, 0.34)
        cx, cy = R / 2 + g.uniform(-0.12 * R, 0.12 * R, size=2)
    else:
        r = R * g.uniform(0.18, 0.3)
        cx, cy = g.uniform(r + 2, R - r - 2, size=2)
    parts = [f"a large {main_color} {KINDS[label]}"]
    if g.random() < (0.0 if demo else 0.5):  # a small distractor, away from the main object when it fits
        kind2, color2 = KINDS[g.integers(len(KINDS))], names[g.integers(len(names))]
        r2 = R * g.uniform(0.06, 0.1)
        spots = g.uniform(r2 + 1, R - r2 - 1, size=(16, 2))   # the spot farthest from the main object
        x2, y2 = spots[np.argmax(np.hypot(spots[:, 0] - cx, spots[:, 1] - cy))]
        draw_object(d, kind2, x2, y2, r2, g.uniform(0, math.pi), COLORS[color2])
        parts.append(f"a small {color2} {kind2}")
    draw_object(d, KINDS[label], cx, cy, r, g.uniform(-0.3, 0.3) if demo else g.uniform(0, math.pi),
                COLORS[main_color])
    caption = " and ".join(parts) + f" on a {'textured' if textured else 'plain'} {bg_name} background"
    return img, label, caption


def produce(f, job: ShardJob) -> int:
    seed, resolution, fmt, indices, variety = job.items
    with TarWriter(f) as tar:
        for key, i in zip(job.keys, indices):
            img, label, caption = make_image(seed, i, resolution, variety)
            tar.add(f"{key}.{fmt}", encode_image(img, fmt, quality=95))
            tar.add(f"{key}.cls", str(label).encode())
            tar.add(f"{key}.txt", caption.encode())
            tar.add(f"{key}.json", json.dumps({"source": f"shapes:{seed}:{i}"}).encode())
            progress_tick()
    return len(indices)


def write_shapes(out: str, count: int, resolution: int = 64, seed: int = 0, shard_size: int = 500,
                 fmt: str = "png", workers: int = 1, storage_options: dict | None = None,
                 progress: bool = True, start: int = 0, variety: str = "full"):
    """Images ``start`` .. ``start + count - 1``: two sets drawn from disjoint index ranges share
    no image (a held-out set)."""
    if variety not in VARIETIES:
        raise InputError(f"shapes variety {variety!r}: choose one of {', '.join(VARIETIES)}")
    jobs = []
    for s, lo in enumerate(range(start, start + count, shard_size)):
        idx = list(range(lo, min(start + count, lo + shard_size)))
        jobs.append(ShardJob(s, shard_name("shapes", s), [f"{i:09d}" for i in idx], (seed, resolution, fmt, idx, variety)))
    # Everything that decides a shard's bytes: a rerun keeps shards only when all of it is unchanged.
    meta = {"source": "make_shapes", "seed": seed, "resolution": resolution, "count": count,
            "image_format": fmt,
            **({"start": start} if start else {}), **({"variety": variety} if variety != "full" else {})}
    return write_shard_set(out, jobs, produce, fmt=IMAGES_FORMAT, classes=list(KINDS), meta=meta,
                           workers=workers, storage_options=storage_options, progress=progress,
                           created_by="data_tools.make_shapes")


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.make_shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output URL (path, file://, s3://, memory://)")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first image index (a held-out set: a range no other set uses)")
    p.add_argument("--variety", choices=VARIETIES, default="full",
                   help="full: objects anywhere, any size and rotation, textures, distractors; demo: see make_image")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"])
    p.add_argument("--workers", type=int, default=1)
    add_storage_options_arg(p)
    p.add_argument("--no-progress", action="store_true")
    ns = p.parse_args(argv)
    res = write_shapes(ns.out, ns.count, ns.resolution, ns.seed, ns.shard_size, ns.image_format,
                       ns.workers, ns.storage_options, not ns.no_progress, ns.start, ns.variety)
    print(f"{res.samples} shapes images ({ns.resolution}px, {len(KINDS)} classes) -> {res.manifest_url} "
          f"(written {res.written}, kept {res.kept}{res.note()}; {res.items_per_s:.0f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
