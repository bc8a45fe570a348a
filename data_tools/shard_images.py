"""python -m data_tools.shard_images INPUT OUT_URL [options]: images -> WebDataset image shards.

INPUT is one of (``--input-format auto`` tells them apart):
  folder   a flat folder of images
  classes  an ImageNet-style tree, one sub-folder per class (class index = sorted folder names)
  list     a text file of image paths, one per line (FFHQ style; relative to the list's folder)
  jsonl    lines of {"image": path, "caption": text[, "label": int]}

OUT_URL is any fsspec URL (a path, file://, s3://, memory://). Each shard is committed
atomically; a rerun keeps shards that are complete, verified and made with the same options
(else it rewrites them all); manifest.json comes last.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
from dataclasses import dataclass

import numpy as np

from mqscale.core import storage
from mqscale.core.cli import add_storage_options_arg, guarded
from mqscale.core.errors import InputError
from mqscale.data.images import IMAGE_EXTS, encode_image, load_rgb, resize_center_crop
from mqscale.data.manifest import IMAGES_FORMAT
from mqscale.data.tar import TarWriter
from mqscale.data.writer import ShardJob, progress_tick, shard_name, write_shard_set

IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)


@dataclass
class Entry:
    source: str            # URL/path of the image
    label: int = -1
    caption: str = ""


@dataclass
class Options:
    resolution: int
    image_format: str      # keep | jpg | png | webp
    quality: int
    storage_options: dict | None


def _is_image(p: str) -> bool:
    return p.lower().endswith(IMAGE_SUFFIXES)


def discover(inp: str, kind: str, storage_options: dict | None) -> tuple[list[Entry], list[str] | None, str]:
    """Entries in a deterministic (sorted) order, the class names, and the detected kind."""
    filesystem, path = storage.get_fs(inp, storage_options)
    proto = storage.protocol(filesystem)
    url = (lambda p: p) if proto in ("file", "local") else (lambda p: f"{proto}://{p}")
    if not filesystem.exists(path):
        raise InputError(f"{inp}: input not found")
    if kind == "auto":
        if filesystem.isfile(path):
            kind = "jsonl" if path.endswith(".jsonl") else "list"
        else:
            top = filesystem.ls(path, detail=True)
            has_dirs = any(t["type"] == "directory" for t in top)
            has_imgs = any(t["type"] == "file" and _is_image(t["name"]) for t in top)
            kind = "classes" if has_dirs and not has_imgs else "folder"
    if kind == "folder":
        files = sorted(p for p in filesystem.ls(path, detail=False) if _is_image(p))
        return [Entry(url(p)) for p in files], None, kind
    if kind == "classes":
        names = sorted(posixpath.basename(d["name"].rstrip("/")) for d in filesystem.ls(path, detail=True)
                       if d["type"] == "directory")
        entries = []
        for i, c in enumerate(names):
            files = sorted(p for p in filesystem.find(posixpath.join(path, c)) if _is_image(p))
            entries += [Entry(url(p), label=i) for p in files]
        return entries, names, kind
    root = posixpath.dirname(path)
    lines = [ln for ln in filesystem.cat_file(path).decode().splitlines() if ln.strip()]
    resolve = lambda p: p if "://" in p or p.startswith("/") else url(posixpath.join(root, p))  # noqa: E731
    if kind == "list":
        return [Entry(resolve(ln.strip())) for ln in lines], None, kind
    if kind == "jsonl":
        entries = []
        for n, ln in enumerate(lines, 1):
            try:
                d = json.loads(ln)
                entries.append(Entry(resolve(d["image"]), int(d.get("label", -1)), str(d.get("caption", ""))))
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{inp}:{n}: not an {{\"image\": ..., \"caption\": ...}} line ({e})") from None
        return entries, None, kind
    raise InputError(f"input format {kind!r} is not one of auto, folder, classes, list, jsonl")


def inputs_sha256(entries: list[Entry]) -> str:
    """A checksum of the ordered input list: keys are indices, so an added or renamed file
    shifts what every later key holds, and a rerun must see that."""
    text = json.dumps([[e.source, e.label, e.caption] for e in entries], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_members(key: str, e: Entry, opts: Options) -> list[tuple[str, bytes]]:
    with storage.open_read(e.source, opts.storage_options) as f:
        raw = f.read()
    ext = e.source.rsplit(".", 1)[-1].lower()
    if opts.image_format == "keep" and not opts.resolution:
        img_ext, data = ("jpg" if ext == "jpeg" else ext), raw
    else:
        try:
            img = load_rgb(raw)
        except (ValueError, OSError, SyntaxError) as err:  # PIL raises all three; bombs are ValueError
            raise InputError(f"{e.source}: not a decodable image ({type(err).__name__}: {err})") from None
        if opts.resolution:
            img = resize_center_crop(img, opts.resolution)
        img_ext = "jpg" if opts.image_format == "keep" else opts.image_format
        data = encode_image(img, img_ext, opts.quality)
    out = [(f"{key}.{img_ext}", data)]
    if e.label >= 0:
        out.append((f"{key}.cls", str(e.label).encode()))
    if e.caption:
        out.append((f"{key}.txt", e.caption.encode()))
    out.append((f"{key}.json", json.dumps({"source": e.source}).encode()))
    return out


def produce(f, job: ShardJob) -> int:
    opts, entries = job.items
    with TarWriter(f) as tar:
        for key, e in zip(job.keys, entries):
            for name, data in sample_members(key, e, opts):
                tar.add(name, data)
            progress_tick()
    return len(entries)


def plan_shards(entries: list, per_shard: int, prefix: str, opts, key_of=lambda i: f"{i:09d}") -> list[ShardJob]:
    jobs = []
    for s, lo in enumerate(range(0, len(entries), per_shard)):
        chunk = entries[lo:lo + per_shard]
        jobs.append(ShardJob(s, shard_name(prefix, s), [key_of(lo + j) for j in range(len(chunk))], (opts, chunk)))
    return jobs


def samples_per_shard(entries: list[Entry], opts: Options, shard_mb: float) -> int:
    """Shard size in samples for a target in MB, from the encoded size of the first few images."""
    probe = entries[:32]
    sizes = [sum(len(d) for _, d in sample_members("probe", e, opts)) + 2048 for e in probe]
    return max(1, int(shard_mb * 1e6 / (sum(sizes) / len(sizes))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.shard_images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder, class tree, list file or JSONL (local or fsspec URL)")
    p.add_argument("out", help="output URL for shards + manifest.json")
    p.add_argument("--input-format", default="auto", choices=["auto", "folder", "classes", "list", "jsonl"])
    p.add_argument("--resolution", type=int, default=0, help="resize + center-crop to NxN (0 = keep)")
    p.add_argument("--image-format", default="keep", choices=["keep", "jpg", "png", "webp"],
                   help="keep: store the source bytes when not resizing (else jpg)")
    p.add_argument("--quality", type=int, default=95)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    size.add_argument("--shard-mb", type=float, default=None, help="target shard size in MB")
    p.add_argument("--prefix", default="images")
    p.add_argument("--seed", type=int, default=0, help="sample order seed (-1 keeps sorted order)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers")
    add_storage_options_arg(p)
    p.add_argument("--no-progress", action="store_true")
    return p


@guarded
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    storage_options = ns.storage_options
    entries, classes, kind = discover(ns.input, ns.input_format, storage_options)
    if not entries:
        raise InputError(f"{ns.input}: no images found ({kind})")
    if ns.seed >= 0:
        order = np.random.default_rng(ns.seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    opts = Options(ns.resolution, ns.image_format, ns.quality, storage_options)
    per = samples_per_shard(entries, opts, ns.shard_mb) if ns.shard_mb else ns.shard_size
    jobs = plan_shards(entries, per, ns.prefix, opts)
    # Everything that decides a shard's bytes: a rerun keeps shards only when all of it is unchanged.
    meta = {"source": ns.input, "input_format": kind, "resolution": ns.resolution, "seed": ns.seed,
            "image_format": ns.image_format, "quality": ns.quality, "inputs_sha256": inputs_sha256(entries)}
    res = write_shard_set(ns.out, jobs, produce, fmt=IMAGES_FORMAT, classes=classes, meta=meta,
                          workers=ns.workers, storage_options=storage_options, progress=not ns.no_progress,
                          created_by="data_tools.shard_images")
    print(f"{res.samples} images in {len(jobs)} shards -> {res.manifest_url} "
          f"(written {res.written}, kept {res.kept}{res.note()}; {res.items_per_s:.0f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
