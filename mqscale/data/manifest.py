"""Shard manifests: the self-describing index of a shard set, written last and atomically.

A manifest names every shard with its sample count, byte size and sha256, carries the class
map, and for token shards the facts a consumer must agree with (grid, codebook, L, condition,
tokenizer checksum). Because it is written after every shard is committed, a manifest that
exists describes a complete set; its absence means the writer has not finished.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mqscale.core import storage
from mqscale.core.errors import ManifestError
from mqscale.core.storage import unsafe_name

MANIFEST_NAME = "manifest.json"
IMAGES_FORMAT = "mqscale-images/1"
TOKENS_FORMAT = "mqscale-tokens/1"
FORMATS = {IMAGES_FORMAT: "images", TOKENS_FORMAT: "tokens"}


@dataclass
class ShardInfo:
    name: str
    n: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    format: str
    shards: list[ShardInfo]
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    created_by: str = "mqscale"

    @property
    def kind(self) -> str:
        return FORMATS[self.format]

    @property
    def total(self) -> int:
        return sum(s.n for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def manifest_url(base: str) -> str:
    return base if base.endswith(".json") else storage.join(base, MANIFEST_NAME)


def base_of(manifest_url_: str) -> str:
    return manifest_url_.rsplit("/", 1)[0] if "/" in manifest_url_ else "."


def write_manifest(base: str, manifest: Manifest, storage_options: dict | None = None) -> str:
    url = manifest_url(base)
    storage.write_bytes(url, manifest.to_json().encode(), storage_options)
    return url


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    url = manifest_url(url)
    try:
        raw = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ManifestError(f"{url}: no manifest (a shard writer writes it last; is the set complete?)") from None
    try:
        d = json.loads(raw)
        if d.get("format") not in FORMATS:
            raise ManifestError(f"{url}: format {d.get('format')!r} is not one of {sorted(FORMATS)}")
        shards = [ShardInfo(**s) for s in d["shards"]]
        for s in shards:  # a shard name is joined to the manifest's directory: it must stay inside it
            why = unsafe_name(s.name)
            if why:
                raise ManifestError(f"{url}: shard name {s.name!r} is unsafe ({why})")
        return Manifest(format=d["format"], shards=shards, classes=d.get("classes"),
                        meta=d.get("meta") or {}, created_by=d.get("created_by", ""))
    except ManifestError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{url}: malformed manifest ({type(e).__name__}: {e})") from None
