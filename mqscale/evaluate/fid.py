"""FID and IS: Inception features, their statistics, and reference statistics kept beside the shards.

FID is the Fréchet distance (``core.frechet``) between 2048-d pool features. IS =
exp(E_x KL(p(y|x) || p(y))) over 10 splits, from the logits without bias (torch-fidelity's way).

The Inception weights are never downloaded: ``load_inception`` reads the pytorch-fid /
torch-fidelity file from a local or fsspec path, and without one says which file to fetch.
Reference statistics of an image shard set are computed once and stored beside the shards
(``fid_stats/<tag>.npz`` + ``.json`` with the npz's sha256, the Inception file's sha256, the
image count and the manifest's sha256); a later run reuses them only when all of those agree.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Iterable

import numpy as np
import torch

from mqscale.core import storage
from mqscale.core.errors import InputError
from mqscale.core.frechet import FeatureStats
from mqscale.data.manifest import base_of, manifest_url
from mqscale.models.inception import InceptionV3
from mqscale.models.lpips import state_dict_from_bytes

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
STATS_FORMAT = "mqscale-fid-stats/1"


def missing_weights(what: str = "FID/IS") -> InputError:
    return InputError(f"{what} needs the Inception weights {INCEPTION_FILE} (pytorch-fid / torch-fidelity "
                     f"format), which are never downloaded at run time: fetch {INCEPTION_URL} on a machine "
                     "with internet, put it on a local or fsspec path and set eval.inception_weights=PATH")


def load_inception(path: str, storage_options: dict | None = None, device: str | torch.device = "cpu",
                   input_size: int = 299) -> tuple[InceptionV3, str]:
    """(the FID Inception in eval mode, the weights file's sha256)."""
    if not path:
        raise missing_weights()
    try:
        raw = storage.read_bytes(path, storage_options)
    except FileNotFoundError:
        raise missing_weights(f"{path} does not exist; FID/IS") from None
    sha = hashlib.sha256(raw).hexdigest()
    model = InceptionV3(input_size)
    try:
        sd = state_dict_from_bytes(raw, path)
    except Exception as e:  # an unreadable file: one line naming it
        raise InputError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from old torch files
    if missing or unexpected:
        raise InputError(f"{path}: not the FID Inception weights {INCEPTION_FILE} (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]})")
    return model.eval().to(device), sha


@torch.no_grad()
def extract(model: InceptionV3, batches: Iterable[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(pool features [N, 2048], unbiased logits [N, 1008]) of uint8 image batches."""
    device = next(model.parameters()).device
    feats, logits = [], []
    for b in batches:
        f, lg = model(b.to(device))
        feats.append(f.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
    if not feats:
        raise ValueError("no images to compute features of")
    return np.concatenate(feats), np.concatenate(logits)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` equal parts."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(logp, min(splits, len(logp))):
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0) + 1e-30)
        scores.append(np.exp((p * (part - log_py)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- reference statistics


def _npz_bytes(stats: FeatureStats) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n))
    return buf.getvalue()


def stats_location(shards: str, inception_sha: str, input_size: int, resolution: int, n: int) -> str:
    tag = f"inception-{inception_sha[:12]}-in{input_size}-res{resolution}-n{n}"
    return storage.join(base_of(manifest_url(shards)), f"fid_stats/{tag}")


def source_identity(shards: str, storage_options: dict | None) -> str:
    return hashlib.sha256(storage.read_bytes(manifest_url(shards), storage_options)).hexdigest()


def load_reference(location: str, expect: dict, storage_options: dict | None = None) -> FeatureStats | None:
    """Stored statistics, or None when absent, damaged or made from other inputs."""
    try:
        meta = json.loads(storage.read_bytes(location + ".json", storage_options))
        raw = storage.read_bytes(location + ".npz", storage_options)
    except (FileNotFoundError, ValueError):
        return None
    if meta.get("format") != STATS_FORMAT or hashlib.sha256(raw).hexdigest() != meta.get("npz_sha256"):
        return None
    if any(meta.get(k) != v for k, v in expect.items()):
        return None
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return FeatureStats(z["mu"], z["sigma"], int(z["n"]))


def save_reference(location: str, stats: FeatureStats, meta: dict, storage_options: dict | None = None) -> None:
    """The npz first, then the JSON naming its sha256: a reader that finds the JSON finds both."""
    raw = _npz_bytes(stats)
    storage.write_bytes(location + ".npz", raw, storage_options)
    record = {"format": STATS_FORMAT, "npz_sha256": hashlib.sha256(raw).hexdigest(), **meta}
    storage.write_bytes(location + ".json", (json.dumps(record, indent=1) + "\n").encode(), storage_options)
