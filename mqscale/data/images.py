"""Image samples: decode, resize + center-crop, and the member names an image shard uses.

An image shard is a plain per-sample WebDataset: ``key.jpg|png|webp`` plus optional
``key.cls`` (class index as text), ``key.txt`` (caption) and ``key.json`` (source metadata).
"""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = {"cls", "txt", "json"}
# Largest image decoded (PIL's own default bomb limit, ~9459x9459). A header can claim any size
# in a few bytes; decoding it would allocate w*h*3 bytes, so the size is checked before load().
MAX_PIXELS = 89_478_485


def load_rgb(data: bytes) -> Image.Image:
    """Decode to RGB; ValueError for an image over ``MAX_PIXELS`` (a decompression bomb), which
    PIL would otherwise raise as DecompressionBombError, an exception no caller expects."""
    try:
        with warnings.catch_warnings():  # PIL warns (then decodes) between 1x and 2x its limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"image claims {w}x{h} pixels, over the pixel limit of {MAX_PIXELS:,}")
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image over the pixel limit of {MAX_PIXELS:,} ({e})") from None
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
