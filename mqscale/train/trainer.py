"""The one Stackformer training loop, run by every rank under Ray Train or the deepspeed launcher.

It knows nothing of Ray: a session gives rank, world, device, the run's storage URL, and how a
checkpoint is committed. Each micro-batch comes from the streaming loader (fixed size, masked
holes dropped before the forward), goes through the DeepSpeed engine (ZeRO, accumulation,
clipping, bf16), and a loss that is not finite on any rank skips that micro-batch everywhere.
Checkpoints carry the step, tokens seen, every rank's data position and RNG, and the resolved
config; resume verifies them (``core/checkpoint.py``) and continues exactly, on the same number
of workers or another (``elastic.py``: the global batch kept, ZeRO states resharded, the rest of
the epoch split over the new ranks). The fault suite's hooks (``faults.py``) sit in this path
and are off unless their environment variables are set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import Iterator

import torch

from mqscale.core import dist, storage
from mqscale.core.checkpoint import CheckpointStore, choose_resume
from mqscale.core.compiling import CompileWatch
from mqscale.core.errors import CheckpointError
from mqscale.core.images import png_bytes, tile, to_unit
from mqscale.core.secrets import without_credentials
from mqscale.core.session import Session, commit_checkpoint, scratch_dir
from mqscale.core.tensorboard import RunWriter
from mqscale.data.loader import StreamingLoader
from mqscale.models.stackformer.counting import train_flops_per_token
from mqscale.judge.metrics import accuracy, load_judge
from mqscale.models.stackformer.decode import Decoding
from mqscale.models.stackformer.sampling import DEFAULT_GUIDANCE, default_params
from mqscale.tokenizer.config import TOKENIZER
from mqscale.train.config import Config
from mqscale.train import elastic
from mqscale.train.engine import TAG, build_engine, compiled, import_deepspeed
from mqscale.train.faults import SampleTrace, dump_optimizer, fault_point, inject_nan
from mqscale.train.metrics import Metrics, device_peak_tflops, memory_gb
from mqscale.train.optim import lr_at, n_params

log = logging.getLogger("mqscale.train")
RUN_CONFIG = "run_config.json"  # the resolved run config, so the checkpoint alone rebuilds its model


class TrainingStopped(RuntimeError):
    """The run stopped itself (e.g. a streak of non-finite losses) after a final checkpoint."""


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


class Trainer:
    def __init__(self, cfg: Config, session: Session):
        self.cfg, self.session = cfg, session
        self.rank, self.world = session.rank, session.world
        self.store = CheckpointStore(session.run_url, cfg.checkpoint.storage_options)
        # the checkpoint to resume (any world), what it recorded, and its universal conversion
        # when it comes from another world: all before the engine, which they shape
        self.found = choose_resume(self.store, cfg.checkpoint, session.launch_id, None)
        self.saved, self.conversion = elastic.prepare(self.store, self.found, cfg, self.world, TAG)
        self.plan = elastic.plan_batch(cfg, self.world, self.saved, self.found.url if self.found else "")
        self.engine, self.ds_config = build_engine(cfg, self.world, self.plan, universal=self.conversion is not None)
        self.model = self.engine.module
        self.device = self.engine.device
        data = dataclasses.replace(cfg.data, batch_size=self.plan.micro)
        self.loader = StreamingLoader(cfg.data.train_url, data, self.rank, self.world,
                                      pin_memory=self.device.type == "cuda")
        self.step = self.tokens = self.nonfinite_streak = self.nonfinite_total = self.overflow_total = 0
        # the one setup in which DeepSpeed applies a non-finite gradient: the loop checks it itself
        self.unguarded = cfg.train.precision == "fp32" and cfg.deepspeed.zero_stage == 0
        self.tb = RunWriter(session.run_url, cfg.logging.tensorboard_dir, cfg.checkpoint.storage_options, self.rank)
        self.metrics = Metrics(self.rank, train_flops_per_token(cfg.model),
                               device_peak_tflops(cfg.logging.peak_tflops), self.world)
        self.tokenizer = self.judge = None
        self.quality: dict[str, float] = {}   # the last sample grid's, when a judge is configured
        if cfg.logging.tokenizer and self.rank == 0:
            self.tokenizer, _ = TOKENIZER.load(cfg.logging.tokenizer, self.device)
        if cfg.logging.judge and self.rank == 0:   # checked before the workers started (validate.check_judge)
            self.judge = load_judge(cfg.logging.judge, self.device, min_accuracy=cfg.logging.judge_min_accuracy)
        # a compiled step whose shapes change is recompiled each time: warned, and stopped when a storm
        # (two warm-up micro-steps: under ZeRO-3 the second compiles once more, as DeepSpeed's hooks settle)
        self.watch = CompileWatch("the compiled training step", limit=8, warmup=2) if compiled(self.engine) else None
        # sample grids: weights that train on (not frozen); under ZeRO-3 the gathered weights are
        # other tensors each time, so decoding stays eager there
        self.decoding = Decoding("off" if cfg.deepspeed.zero_stage == 3 else cfg.logging.sample_compile,
                                 freeze=False, say=log.info)
        self.restored_from = self._restore()
        self.trace = SampleTrace(self.rank, self.world, self.step)
        if self.rank == 0:   # every start of a worker group: a resize shows as a change
            self.tb.scalars(self.step, {"scaling/world_size": float(self.world),
                                        "scaling/grad_accum": float(self.plan.accum),
                                        "scaling/micro_batch": float(self.plan.micro)})

    # ------------------------------------------------------------------ checkpoints

    def _restore(self) -> str | None:
        """Every rank loads the checkpoint rank 0 chose (``choose_resume``): its own ZeRO shards
        when the world is the checkpoint's, the universal conversion (or, under ZeRO-0, the
        whole checkpoint) when it is another; then its data position and RNG."""
        found = self.found
        if found is None:
            return None
        source = self.conversion or found
        with scratch_dir("mqscale-restore-") as d:
            self.store.download(source, d, rank=None if self.conversion else self.rank)
            try:
                path, client = self.engine.load_checkpoint(str(d), tag=TAG, load_lr_scheduler_states=False)
            except (AssertionError, OSError, KeyError, ValueError, RuntimeError) as e:
                why = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} in DeepSpeed's loader"
                raise CheckpointError(f"{source.url}: DeepSpeed could not load it ({why})") from e
            if path is None or client is None:
                raise CheckpointError(f"{source.url}: DeepSpeed loaded nothing from it (returned None)")
        self.step, self.tokens = int(client["step"]), int(client["tokens"])
        states = client["loader"]
        mine = states[self.rank] if self.rank < len(states) else None
        same = mine is not None and len(states) == self.world and all(
            mine.get(k) == v for k, v in self.loader.state_dict().items() if k in ("world", "workers", "batch_size"))
        if same:
            self.loader.load_state_dict(mine)
        else:  # another world, micro-batch or loader workers: this rank's share of the epoch's rest
            try:
                self.loader.adopt(states)
            except ValueError as e:
                raise CheckpointError(f"{found.url}: its data positions cannot be continued ({e})") from None
        if len(states) == self.world:
            rng = client["rng"][self.rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            elastic.seed_rank(self.saved, self.rank, self.world)
        log.info("rank %d resumed from %s at step %d", self.rank, found.url, self.step)
        if self.rank == 0 and len(states) != self.world:
            before = self.saved
            left = (f"{self.loader.carry.rows} samples of epoch {self.loader.epoch} left" if self.loader.carry
                    else f"epoch {self.loader.epoch} from its start")
            log.info("resized: %d -> %d workers at step %d, global batch %d kept (micro-batch x workers x "
                     "accumulation: %d x %d x %d -> %s); %s; %s", before["world"], self.world, self.step,
                     self.plan.global_batch, before["micro_batch"], before["world"], before["grad_accum"],
                     f"{self.plan.micro} x {self.world} x {self.plan.accum}", left,
                     f"ZeRO states from {self.conversion.url}" if self.conversion else "ZeRO-0: whole copies")
        dump_optimizer(self.engine, "restored", self.step, self.world, self.rank)
        return found.url

    def save(self, metrics: dict) -> None:
        with scratch_dir("mqscale-ckpt-") as staging:
            client = {"step": self.step, "tokens": self.tokens, "world": self.world,
                      "loader": dist.gather(self.loader.state_dict()), "rng": dist.gather(rng_state()),
                      "config": without_credentials(self.cfg)}
            self.engine.save_checkpoint(str(staging), tag=TAG, client_state=client)
            if self.rank == 0:  # the checkpoint describes itself: export and a resize need nothing else
                (staging / RUN_CONFIG).write_text(json.dumps(without_credentials(self.cfg), indent=1))
                record = elastic.resize_record(self.cfg, self.plan, self.step, client["loader"], client["rng"][0])
                (staging / elastic.RESIZE).write_text(json.dumps(record, indent=1))
            commit_checkpoint(self.session, self.store, staging, self.step, metrics, {"name": self.cfg.name})
            if self.rank == 0:
                elastic.prune_conversions(self.store, self.cfg.checkpoint.keep_last)
        dump_optimizer(self.engine, "saved", self.step, self.world, self.rank)
        self.tb.sync()

    # ------------------------------------------------------------------ the loop

    def batches(self) -> Iterator[dict]:
        while True:
            yield from self.loader

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict, bool]:
        keep = batch["mask"]
        weight = 1.0 if bool(keep.any()) else 0.0
        if not weight:  # only padding on this rank: a zero-weighted step keeps the collectives in step
            keep = torch.zeros_like(keep)
            keep[0] = True
        codes, pos = batch["codes"][keep].to(self.device), batch["positions"][keep].to(self.device)
        cond = batch["cond"][keep].to(self.device) if "cond" in batch else None
        if cond is not None:  # classifier-free guidance: a share of rows trains the null condition
            cond = self.model.drop_condition(cond, self.cfg.train.p_uncond)
        out = self.engine(codes, pos, cond=cond)
        loss = inject_nan(out.loss * weight, self.step + 1, self.rank)
        # one collective for both: ranks whose loss is not finite, and sequences over all ranks
        rows = float(keep.sum()) * weight
        flags = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0, rows], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce_sum_(flags)
        ok = flags[0].item() == 0
        if ok:
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.backward(loss)
            if boundary and self.unguarded and not self._grads_finite():
                ok = False
                skip_optimizer_step(self.engine)
            else:
                self.engine.step()
            # DeepSpeed skips an update whose gradient norm is not finite (bf16, fp16, and fp32 under
            # ZeRO 1-3); fp16's loss scaler also skips while it searches its scale, which is no fault
            if ok and boundary and not self.engine.was_step_applied():
                if self.cfg.train.precision == "fp16":
                    self.overflow_total += 1
                else:
                    ok = False
        if self.watch is not None:  # after the first backward: the step's graphs are all built
            shapes = f"codes {list(codes.shape)}"
            self.watch.observe(shapes)
        parts = {"loss/total": out.loss.item(), "loss/code": out.code_loss.item(),
                 "loss/position": out.pos_loss.item(), "sequences": rows, "sequences_all": flags[1].item()}
        return loss, parts, ok

    def _grads_finite(self) -> bool:
        """fp32 under ZeRO-0 runs the torch optimizer with no overflow check: check the (already
        all-reduced) gradients here, agreeing on all ranks."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        bad = (~ok).to(device=self.device, dtype=torch.float32).reshape(1)   # one read-back below
        dist.all_reduce_sum_(bad)
        return bad.item() == 0

    def fit(self) -> dict:
        cfg = self.cfg
        max_steps, every = cfg.train.max_steps, cfg.checkpoint.every_steps or math.inf
        if self.restored_from and self.step >= max_steps:
            log.info("rank %d: %s is at step %d already (train.max_steps=%d): nothing to do", self.rank,
                     self.restored_from, self.step, max_steps)
            self.tb.close()
            return {"step": self.step, "tokens": self.tokens, "nonfinite_skipped": 0}
        it = self.batches()
        window: list[dict] = []
        wait = busy = paused = 0.0
        steps = 0  # optimizer steps in the current logging window
        t_last = time.perf_counter()
        last: dict = {}
        while self.step < max_steps:
            lr = lr_at(self.step, cfg.optim, max_steps)
            for g in self.engine.optimizer.param_groups:
                g["lr"] = lr
            t = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t
            before = self.engine.global_steps
            _, parts, ok = self.micro_step(batch)
            busy = time.perf_counter() - t_last - paused
            if not ok:
                self.nonfinite_streak += 1
                self.nonfinite_total += 1
                log.warning("rank %d: non-finite loss or gradient at step %d, skipped (%d in a row)", self.rank,
                            self.step + 1, self.nonfinite_streak)
                if self.nonfinite_streak > cfg.train.max_nonfinite:
                    why = (f"{self.nonfinite_streak} non-finite losses or gradients in a row at step {self.step + 1} "
                           f"(train.max_nonfinite={cfg.train.max_nonfinite}); saved a checkpoint and stopped")
                    # the reason travels with the checkpoint's report: the driver reads it from there
                    self.save({"step": self.step, "stopped": 1.0, "stopped_reason": why})
                    self.tb.close()
                    raise TrainingStopped(why)
                continue
            self.nonfinite_streak = 0
            self.tokens += int(parts["sequences_all"]) * cfg.model.seq_len   # the run's tokens, all ranks
            self.trace.add(batch)
            window.append(parts)
            if self.engine.global_steps == before:  # still accumulating
                continue
            self.step += 1
            steps += 1
            self.trace.step(self.step)
            fault_point(self.step, self.rank)
            if self.step % cfg.logging.log_every == 0 or self.step == max_steps:
                last = self._log(window, lr, wait, busy, steps)
                window, wait, paused, steps, t_last = [], 0.0, 0.0, 0, time.perf_counter()
            t = time.perf_counter()  # sampling and saving stay out of the throughput windows
            if cfg.logging.image_every and self.step % cfg.logging.image_every == 0:
                self.sample_grid()
                if self.watch is not None:
                    self.watch.rebase()  # a grid's decoder compiles are not the step's
            if self.step % every == 0 and self.step < max_steps:
                self.save({"step": self.step, **last})
            paused += time.perf_counter() - t
        self.save({"step": self.step, **last})
        if not (cfg.logging.image_every and self.step % cfg.logging.image_every == 0):
            self.sample_grid()  # (the loop has just drawn this step's grid otherwise)
        self.tb.hparams({"name": cfg.name, "params": n_params(self.model), "zero_stage": cfg.deepspeed.zero_stage,
                         "world": self.world, "lr": cfg.optim.lr, "batch": cfg.data.batch_size},
                        {k: v for k, v in last.items() if k.startswith("loss/")})
        self.tb.close()
        return {"step": self.step, "tokens": self.tokens, "nonfinite_skipped": self.nonfinite_total, **last,
                **self.quality}

    def _log(self, window: list[dict], lr: float, wait: float, busy: float, steps: int) -> dict:
        n = max(1, len(window))
        v = {k: sum(w[k] for w in window) / n for k in ("loss/total", "loss/code", "loss/position")}
        seqs_all = sum(w["sequences_all"] for w in window)           # already summed over the ranks
        stats = dist.all_reduce_sum_(torch.tensor([busy, wait], dtype=torch.float64, device=self.device)) / self.world
        busy_s, wait_s = stats.tolist()
        v.update({"lr": lr, "perf/sequences_per_s": seqs_all / max(busy_s, 1e-9),
                  "perf/step_time_s": busy_s / max(1, steps), "perf/data_wait_share": wait_s / max(busy_s, 1e-9),
                  "memory_gb": memory_gb(), "skipped/nonfinite": float(self.nonfinite_total)})
        if self.cfg.train.precision == "fp16":
            v["skipped/fp16_overflow"] = float(self.overflow_total)
        v.update(self.metrics.throughput(v["perf/sequences_per_s"] * self.cfg.model.seq_len))
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            v["grad_norm"] = float(gn)
        counters = self.loader.stats()            # delivered samples and every skip counter, all ranks
        keys = sorted(counters)
        summed = dist.all_reduce_sum_(torch.tensor([float(counters[k]) for k in keys], dtype=torch.float64,
                                                   device=self.device))
        v.update({f"data/{k}": x for k, x in zip(keys, summed.tolist())})
        self.tb.scalars(self.step, v)
        self.metrics.console(self.step, self.cfg.train.max_steps, v)
        return v

    @torch.no_grad()
    def sample_grid(self) -> None:
        """Samples of fixed classes with fixed seeds, drawn as ``mqscale.sample`` draws by default,
        decoded by rank 0 and logged as a grid with a row per class; with a judge, also their
        quality (``quality/cond_acc``, ``quality/fd_judge``). Under ZeRO-3 every rank takes part: the
        weights are gathered whole for the while (a full bf16 copy of the model per rank) and all
        ranks run the same draws, so any collective the partitioned modules make happens on all."""
        if not self.cfg.logging.tokenizer:
            return
        zero3 = self.cfg.deepspeed.zero_stage == 3
        if self.rank != 0 and not zero3:
            return
        m, lg = self.cfg.model, self.cfg.logging
        n_cls = min(m.n_classes, 10) if m.cond == "class" else 1
        per_class = -(-lg.judge_samples // n_cls) if lg.judge else 4   # judge_samples, classes in turn
        cond = torch.arange(n_cls, device=self.device).repeat_interleave(per_class) if m.cond == "class" else None
        p = default_params(m.codebook_size)
        guidance = DEFAULT_GUIDANCE if m.cond != "none" and self.cfg.train.p_uncond > 0 else None
        gathered = contextlib.nullcontext()
        if zero3:
            gathered = import_deepspeed().zero.GatheredParameters(list(self.model.parameters()))
        with gathered, torch.autocast(self.device.type, dtype=torch.bfloat16,
                                      enabled=self.cfg.train.precision == "bf16"):
            every = self.cfg.logging.image_every
            left = (self.cfg.train.max_steps - self.step) // every if every else 0  # grids still to come
            codes, pos = self.decoding.sample(self.model, cond, batch=per_class * n_cls, code=p, pos=p,
                                              guidance=guidance, batches_left=left,
                                              generator=torch.Generator(self.device).manual_seed(0))
        if self.rank == 0:
            self._log_grid(codes, pos, cond, per_class)

    def _log_grid(self, codes: torch.Tensor, pos: torch.Tensor, cond: torch.Tensor | None, per_class: int) -> None:
        images = self.tokenizer.decode(codes, pos)
        shown = images.view(-1, per_class, *images.shape[1:])[:, :min(per_class, 10)].flatten(0, 1)
        grid = tile(to_unit(shown), cols=min(per_class, 10)).cpu()   # one row per class
        self.tb.image(self.step, "samples/class_rows", grid)
        storage.write_bytes(storage.join(self.session.run_url, f"samples/step_{self.step:09d}.png"), png_bytes(grid),
                            self.cfg.checkpoint.storage_options)
        if self.judge is not None and cond is not None:
            pred, feats = self.judge.judge(images)
            q = {"quality/cond_acc": accuracy(pred, cond), "quality/fd_judge": self.judge.fd(feats)}
            self.tb.scalars(self.step, q)
            log.info("step %d quality of %d samples: conditional accuracy %.3f, FD_judge %.2f", self.step,
                     len(pred), q["quality/cond_acc"], q["quality/fd_judge"])
            self.quality = q


def skip_optimizer_step(engine) -> None:
    """``engine.step()`` with the torch optimizer's own step left out: DeepSpeed keeps its counters
    and clears the gradients, and no weight or moment changes (as its overflow skip does)."""
    opt = engine.optimizer
    opt.step = lambda *args, **kwargs: None  # shadows the class's step for this one call
    try:
        engine.step()
    finally:
        del opt.step


def train(cfg: Config, session: Session) -> dict:
    return Trainer(cfg, session).fit()
