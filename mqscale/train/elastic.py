"""A Stackformer run continued on another number of workers: the batch, the optimizer, the data.

Why it can be exact: a checkpoint keeps every rank's data position (``resize.json``: the batches
each rank handed out of the current epoch, and how the epoch was split), so the samples already
trained on are known and the new ranks split exactly the rest (``StreamingLoader.adopt``). The
fp32 masters and Adam moments survive through DeepSpeed's universal checkpoint: ``ds_to_universal``
turns every rank's ZeRO 1-3 partition into whole per-parameter tensors, which
``load_universal_checkpoint`` cuts into the new world's partitions. ZeRO-0 keeps whole copies on
every rank and needs no conversion. The global batch stays what the checkpoint says by choosing
the gradient accumulation (and, down to ``train.min_micro_batch``, the micro-batch), so the lr
schedule and the step count keep their meaning; when no setting keeps it, the run stops before
any worker starts. Each new rank's random stream is derived from the checkpoint, so two
identical resizes end with identical weights.

A conversion is made once per checkpoint by rank 0, in the run's storage
(``<run>/universal/<checkpoint>-<sha of its marker>``, never inside the source checkpoint),
checked against the source (every fp32 master equal to DeepSpeed's own ``zero_to_fp32``
consolidation, every moment present, shaped and finite), and committed like a checkpoint: its
marker, written last, lists every file's sha256. One without a marker, or whose files do not
match it, is ignored and made again.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import posixpath
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mqscale.core import dist, storage
from mqscale.core.checkpoint import MARKER, Checkpoint, CheckpointStore, local_files, read_marker, write_marker
from mqscale.core.errors import CheckpointError, ConfigError
from mqscale.core.session import scratch_dir
from mqscale.train.config import Config
from mqscale.train.engine import import_deepspeed

log = logging.getLogger("mqscale.train")
RESIZE = "resize.json"        # in every checkpoint: what a run on another world needs, as JSON
UNIVERSAL = "universal"       # <run>/universal/: the conversions
RESIZE_VERSION = 1


# ------------------------------------------------------------------ the batch


@dataclass(frozen=True)
class BatchPlan:
    """Sequences per optimizer step = micro-batch x world x accumulation."""
    world: int
    micro: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def __str__(self) -> str:
        return f"{self.global_batch} = {self.micro} x {self.world} x {self.accum}"


def _fits(g: int, world: int, micro: int, lowest: int) -> int | None:
    """The largest micro-batch in [lowest, micro] whose multiples by ``world`` divide ``g``."""
    for b in range(micro, lowest - 1, -1):
        if g % (b * world) == 0:
            return b
    return None


def _worlds_that_fit(g: int, micro: int, lowest: int, around: int) -> list[int]:
    return [w for w in range(1, max(2 * around, 8) + 1) if _fits(g, w, micro, lowest)]


def plan_batch(cfg: Config, world: int, saved: dict | None = None, source: str = "") -> BatchPlan:
    """The batch of a run on ``world`` workers; ConfigError (one line) when none keeps it.

    Without a checkpoint (``saved`` None, or one from before ``resize.json``): the config's
    (``train.global_batch``, else data.batch_size x world x train.grad_accum, where an elastic
    run counts its most workers, so its batch does not depend on how many Ray starts). With one: the
    global batch it was saved with, unless ``train.global_batch`` asks for another."""
    t, micro = cfg.train, cfg.data.batch_size
    lowest = min(t.min_micro_batch or micro, micro)
    if saved is None:
        g, key = t.global_batch, "train.global_batch"
        if not g and cfg.ray.elastic:   # the same global batch whichever world Ray starts with
            g = micro * cfg.ray.worlds[-1] * t.grad_accum
            key = f"ray.num_workers: {list(cfg.ray.num_workers)}: the global batch (data.batch_size x max x grad_accum)"
        if not g:
            return BatchPlan(world, micro, t.grad_accum)
        per_micro = micro * world
        if g % per_micro:
            b = _fits(g, world, micro, lowest)
            if b is None:
                fits = _worlds_that_fit(g, micro, lowest, world)
                raise ConfigError(f"{key}: {g} is not divisible by data.batch_size x world "
                                  f"= {micro} x {world} = {per_micro} (worlds that keep it: "
                                  f"{', '.join(map(str, fits)) or 'none'})")
            return BatchPlan(world, b, g // (b * world))
        accum = g // per_micro
        if not t.global_batch:
            return BatchPlan(world, micro, accum)
        if t.grad_accum not in (1, accum):
            raise ConfigError(f"train.grad_accum: {t.grad_accum} contradicts train.global_batch={t.global_batch} "
                              f"(which implies {accum})")
        return BatchPlan(world, micro, accum)
    g = t.global_batch or int(saved["global_batch"])
    if not t.global_batch and world == saved["world"] and micro * world * t.grad_accum != g:
        log.warning("train.grad_accum=%d and data.batch_size=%d ignored: the run keeps its global batch %d "
                    "(set train.global_batch to change it)", t.grad_accum, micro, g)
    b = _fits(g, world, micro, lowest)
    if b is None:
        fits = _worlds_that_fit(g, micro, lowest, max(world, int(saved["world"])))
        what = f"{source} was saved by {saved['world']} workers with global batch {g}" if source else \
            f"the run's global batch {g}"
        hint = ("" if t.min_micro_batch else "; or let the micro-batch shrink: train.min_micro_batch")
        raise ConfigError(f"{what}, which {workers(world)} cannot keep (data.batch_size {micro} x {workers(world)} "
                          f"x any train.grad_accum; micro-batches down to {lowest}): worlds that keep it: "
                          f"{', '.join(map(str, fits)) or 'none'}{hint}")
    return BatchPlan(world, b, g // (b * world))


# ------------------------------------------------------------------ what a checkpoint records


def resize_record(cfg: Config, plan: BatchPlan, step: int, loader_states: list[dict], rng: dict) -> dict:
    """``resize.json``: the world and batch the checkpoint was saved with, every rank's data
    position (their loader states) and a digest of rank 0's RNG that the new ranks' streams are
    derived from."""
    digest = hashlib.sha256(rng["torch"].numpy().tobytes()).hexdigest()
    return {"version": RESIZE_VERSION, "step": step, "world": plan.world, "global_batch": plan.global_batch,
            "micro_batch": plan.micro, "grad_accum": plan.accum, "zero_stage": cfg.deepspeed.zero_stage,
            "loader": loader_states, "rng_digest": digest}


def read_resize(ckpt: Checkpoint, storage_options: dict) -> dict | None:
    """The checkpoint's ``resize.json`` (None for one saved before it existed)."""
    if RESIZE not in ckpt.marker["files"]:
        return None
    try:
        body = json.loads(storage.read_bytes(storage.join(ckpt.url, RESIZE), storage_options))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt.url}: {RESIZE} cannot be read ({e})") from None
    if not isinstance(body, dict) or body.get("version") != RESIZE_VERSION or not isinstance(body.get("loader"), list):
        raise CheckpointError(f"{ckpt.url}: {RESIZE} is not a version-{RESIZE_VERSION} resize record")
    return body


def workers(n: int) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


def not_movable(ckpt: Checkpoint, world: int) -> str:
    """Why a checkpoint without ``resize.json`` cannot continue on ``world`` workers."""
    return (f"{ckpt.url} was saved by {ckpt.world} workers before checkpoints recorded every rank's data "
            f"position ({RESIZE}): it cannot continue on {workers(world)} with each sample trained on exactly "
            f"once; relaunch with {ckpt.world} workers, or start a new run (another name)")


def derived_seed(saved: dict, rank: int, world: int) -> int:
    """The torch seed of rank ``rank`` of ``world`` continuing the checkpoint ``saved`` describes."""
    key = f"{saved['rng_digest']}:{saved['step']}:{saved['world']}->{rank}/{world}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2 ** 63 - 1)


def seed_rank(saved: dict, rank: int, world: int) -> None:
    seed = derived_seed(saved, rank, world)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)


# ------------------------------------------------------------------ the universal conversion


def conversion_name(ckpt: Checkpoint) -> tuple[str, str]:
    """(where in the run the conversion of ``ckpt`` lives, its marker's sha256): named by its
    step and that digest, so another checkpoint of the same step (a --resume-from seed) never
    shares it."""
    digest = hashlib.sha256(json.dumps(ckpt.marker, sort_keys=True).encode()).hexdigest()
    return f"{UNIVERSAL}/{posixpath.basename(ckpt.url.rstrip('/'))}-{digest[:12]}", digest


def conversion_state(store: CheckpointStore, ckpt: Checkpoint) -> str | None:
    """Markers only (before workers start): None when there is no conversion of ``ckpt`` or its
    marker reads, else why it will be ignored and made again."""
    name, _ = conversion_name(ckpt)
    url = storage.join(store.run_url, name)
    if not storage.exists(url, store.storage_options):
        return None
    filesystem, root = storage.get_fs(url, store.storage_options)
    try:
        read_marker(filesystem, posixpath.join(root, MARKER))
    except CheckpointError as e:
        return f"{url}: {e} (a conversion that did not finish)"
    return None


def universal(store: CheckpointStore, ckpt: Checkpoint, tag: str) -> Checkpoint:
    """Rank 0: the verified universal conversion of ``ckpt`` (reused, or made now)."""
    name, digest = conversion_name(ckpt)
    url = storage.join(store.run_url, name)
    if storage.exists(url, store.storage_options):
        try:
            conv = store.open_url(url)
            if conv.marker.get("source_marker_sha256") != digest:
                raise CheckpointError(f"{url}: converted from another checkpoint")
            log.info("universal conversion of %s: reusing %s", ckpt.url, url)
            return conv
        except CheckpointError as e:
            log.warning("universal conversion %s is incomplete or damaged (%s): ignored and made again", url,
                        str(e).removeprefix(url + ": "))
            filesystem, root = storage.get_fs(url, store.storage_options)
            filesystem.rm(root, recursive=True)
    t0 = time.perf_counter()
    with scratch_dir("mqscale-universal-") as d:
        src, out = d / "src", d / "out"
        store.download(ckpt, src)
        t1 = time.perf_counter()
        convert(src / tag, out / tag, ckpt.url)
        check_conversion(src, out / tag, tag, ckpt.url)
        for extra in (RESIZE, "run_config.json"):
            if (src / extra).exists():
                shutil.copy2(src / extra, out / extra)
        (out / "latest_universal").unlink(missing_ok=True)
        files = local_files(out)
        seconds = time.perf_counter() - t1
        write_marker(out, files, ckpt.step, ckpt.world or 0,
                     {"kind": "universal", "source": ckpt.url, "source_marker_sha256": digest,
                      "convert_s": round(seconds, 3),
                      "source_bytes": sum(v["size"] for v in ckpt.marker["files"].values())})
        store.upload(out, name, list(files))
        store.upload(out, name, [MARKER])       # last: the conversion is complete
    log.info("universal conversion of %s (step %d, %d workers): %.1f s (%.1f s converting and checking), %s",
             ckpt.url, ckpt.step, ckpt.world, time.perf_counter() - t0, seconds, url)
    return store.open_url(url)


def convert(src: Path, out: Path, what: str) -> None:
    """DeepSpeed's ``ds_to_universal`` on one checkpoint tag, in this process, quietly."""
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal  # heavy: training processes only
    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
    except Exception as e:  # DeepSpeed asserts and raises anything: one line naming the checkpoint
        tail = " / ".join(said.getvalue().strip().splitlines()[-2:])
        raise CheckpointError(f"{what}: the universal conversion failed ({type(e).__name__}: {e}; {tail})") from e


def check_conversion(src_root: Path, out: Path, tag: str, what: str) -> None:
    """Every fp32 master of the conversion equals DeepSpeed's own consolidation of the source
    partitions (``zero_to_fp32``, another code path), and every Adam moment is there, shaped
    like its parameter and finite."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy: see convert
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ref = get_fp32_state_dict_from_zero_checkpoint(str(src_root), tag=tag)
    zero = out / "zero"
    have = {p.name for p in zero.iterdir() if p.is_dir()} if zero.is_dir() else set()
    if have != set(ref):
        raise CheckpointError(f"{what}: the universal conversion holds other parameters than the checkpoint "
                              f"(missing {sorted(set(ref) - have)[:3]}, extra {sorted(have - set(ref))[:3]})")
    for name, master in ref.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = zero / name / f"{key}.pt"
            if not f.exists():
                raise CheckpointError(f"{what}: the universal conversion lacks {key} of {name}")
            t = torch.load(f, map_location="cpu", weights_only=True)
            # ZeRO 1/2: {"param": tensor shaped like the parameter}; ZeRO-3: the bare tensor, flat
            t = t["param"] if isinstance(t, dict) else t
            if t.numel() == master.numel() and t.dim() == 1:
                t = t.reshape(master.shape)
            if t.shape != master.shape or not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{what}: the universal conversion's {key} of {name} is {tuple(t.shape)} "
                                      f"or not finite (the parameter is {tuple(master.shape)})")
            if key == "fp32" and not torch.equal(t.float(), master.float()):
                raise CheckpointError(f"{what}: the universal conversion's fp32 master of {name} differs from "
                                      "the checkpoint's")


def prune_conversions(store: CheckpointStore, keep_last: int) -> None:
    """Rank 0 after a save: conversions of checkpoints the run no longer keeps (not among its
    ``keep_last`` newest: Ray deletes the oldest after this save) are deleted."""
    base = storage.join(store.run_url, UNIVERSAL)
    filesystem, root = storage.get_fs(base, store.storage_options)
    try:
        if not filesystem.exists(root):
            return
        filesystem.invalidate_cache(root)
        entries = filesystem.ls(root, detail=False)
    except OSError:
        return
    kept = {posixpath.basename(c.url.rstrip("/")) for c in store.candidates()[:keep_last]}
    for path in entries:
        if posixpath.basename(path.rstrip("/")).rsplit("-", 1)[0] not in kept:
            try:
                filesystem.rm(path, recursive=True)
            except (OSError, FileNotFoundError) as e:  # housekeeping: never fails the run
                log.warning("could not remove the old universal conversion %s (%s)", path, e)


# ------------------------------------------------------------------ the choice every rank shares


def prepare(store: CheckpointStore, ckpt: Checkpoint | None, cfg: Config, world: int, tag: str
            ) -> tuple[dict | None, Checkpoint | None]:
    """(the checkpoint's resize record, the universal conversion to load instead of it): rank 0
    reads and converts, every rank gets the same answer (or the same error)."""
    if ckpt is None:
        return None, None

    def decide() -> tuple[dict | None, Checkpoint | None]:
        saved, conv = read_resize(ckpt, store.storage_options), None
        if ckpt.world != world:
            if saved is None:
                raise CheckpointError(not_movable(ckpt, world))
            if cfg.deepspeed.zero_stage > 0:
                conv = universal(store, ckpt, tag)
        return saved, conv
    return dist.decided_on_rank0(decide, CheckpointError, f"prepare the resume from {ckpt.url}")
