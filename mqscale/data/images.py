"""Image samples: decode, resize + center-crop, and the member names an image shard uses.

An image shard is a plain per-sample WebDataset: ``key.jpg|png|webp`` plus optional
``key.cls`` (class index as text), ``key.txt`` (caption) and ``key.json`` (source metadata).
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = {"cls", "txt", "json"}


def load_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` (bicubic), then crop the centre square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"image format {fmt!r} is not one of jpg, png, webp")
    return buf.getvalue()


def decode_image_sample(sample: dict[str, bytes], resolution: int) -> dict:
    """Decode one sample's members. Raises ValueError/OSError on anything undecodable."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image member (has {sorted(sample)})")
    img = load_rgb(sample[ext])
    if resolution:
        img = resize_center_crop(img, resolution)
    out = {"image": np.asarray(img, dtype=np.uint8), "label": -1, "caption": ""}
    if "cls" in sample:
        out["label"] = int(sample["cls"].decode().strip())
    if "txt" in sample:
        out["caption"] = sample["txt"].decode("utf-8")
    if "json" in sample:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict):
            raise ValueError("json member is not an object")
        out["caption"] = out["caption"] or str(meta.get("caption", ""))
    return out
