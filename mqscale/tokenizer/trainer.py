"""The MQ-VAE training loop: generator and discriminator steps over streamed image shards.

One call, ``train_tokenizer(cfg, session)``, runs on every rank. It knows nothing of Ray: the
session carries rank, device and the run's storage, and commits checkpoints. A checkpoint
(``<run>/checkpoint_<step>``, the marker and the resume of ``core/checkpoint.py``, as a
Stackformer run's) is a complete tokenizer export (``model.safetensors`` + ``config.json``,
usable as ``--tokenizer``) plus ``train_state.pt`` (optimizers, discriminator, step, data
position, RNG), read back with ``weights_only=True``. TensorBoard: ``core/tensorboard.py``.

A step reads nothing back from the device: its logs stay 0-dim tensors (loss terms, codebook
usage, restarts, PSNR) and are turned into floats in one transfer on log and checkpoint steps
only, so the host can queue the next step while the device runs this one. (With more than one
rank, the step's valid-image count is still summed over ranks and read back each step: whether
the optimizers step is a host decision.)
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext

import torch
from safetensors.torch import load_file

from mqscale.core import dist
from mqscale.core.artifact import WEIGHTS
from mqscale.core.checkpoint import CheckpointStore, choose_resume
from mqscale.core.images import from_uint8, psnr
from mqscale.core.session import Session, commit_checkpoint, scratch_dir
from mqscale.core.tensorboard import RunWriter
from mqscale.data.loader import StreamingLoader
from mqscale.models.lpips import LPIPS, load_lpips
from mqscale.models.mqvae.model import MQVAE
from mqscale.tokenizer.config import TOKENIZER, TokenizerRunConfig
from mqscale.tokenizer.loss import VQGANLoss
from mqscale.tokenizer.visualize import mask_grid

log = logging.getLogger("mqscale.tokenizer")
STATE = "train_state.pt"


def valid_images(batch: dict, device) -> tuple[torch.Tensor, int]:
    """The batch's valid rows as float [-1, 1] [n, C, H, W], and n. The rows are picked with the
    host's mask (a boolean index on the device waits for the device); a padding-only batch gives
    its first row, which the step weighs 0."""
    mask = batch["mask"].cpu()
    n = int(mask.sum())
    rows = mask.nonzero().flatten() if n else torch.zeros(1, dtype=torch.long)
    x = batch["images"].to(device, non_blocking=True).index_select(0, rows.to(device, non_blocking=True))
    return from_uint8(x), n


def host_floats(logs: dict) -> dict[str, float]:
    """Log values as Python floats; the tensors among them come back in one transfer."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    got = {}
    if keys:
        got = dict(zip(keys, torch.stack([logs[k].detach().reshape(()).double() for k in keys]).tolist()))
    return {k: got[k] if k in got else float(v) for k, v in logs.items()}


@contextmanager
def _frozen_batchnorm_stats(*modules: torch.nn.Module, frozen: bool):
    """Keep BatchNorm running statistics as they were across a padding-only step."""
    if not frozen:
        yield
        return
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        for m, bufs in zip(norms, saved):
            for b, v in zip(m.buffers(), bufs):
                b.copy_(v)


def perceptual(cfg: TokenizerRunConfig) -> LPIPS | None:
    c = cfg.loss
    if c.perceptual_weight <= 0:
        return None
    if not (c.vgg_weights and c.lpips_weights):
        if dist.rank() == 0:
            log.warning("perceptual loss is off: set loss.vgg_weights (torchvision VGG16) and "
                        "loss.lpips_weights (lpips vgg.pth) to local or fsspec paths to turn it on")
        return None
    return load_lpips(c.vgg_weights, c.lpips_weights, cfg.data.storage_options)


def learning_rate(cfg: TokenizerRunConfig, world: int, step: int) -> float:
    o = cfg.optim
    lr = o.base_lr * (cfg.data.batch_size * world if o.scale_lr else 1)
    if o.warmup_steps and step < o.warmup_steps:
        return lr * (step + 1) / o.warmup_steps
    if o.cosine_floor == 1.0:
        return lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.train.max_steps - o.warmup_steps))
    return lr * (o.cosine_floor + (1.0 - o.cosine_floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class TokenizerTrainer:
    def __init__(self, cfg: TokenizerRunConfig, session: Session):
        self.cfg, self.session = cfg, session
        self.device = session.device
        torch.manual_seed(cfg.train.seed)
        self.model = MQVAE(cfg.model).to(self.device)
        self.loss = VQGANLoss(cfg.loss, cfg.model.in_channels, perceptual(cfg)).to(self.device)
        dist.broadcast_module(self.model)
        dist.broadcast_module(self.loss.discriminator)
        if session.world > 1:
            self.model.quantize.sync = dist.DistStatSync()
        betas = tuple(cfg.optim.betas)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=learning_rate(cfg, session.world, 0), betas=betas)
        self.opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=learning_rate(cfg, session.world, 0),
                                      betas=betas)
        self.loader = StreamingLoader(cfg.data.train_url, cfg.data, session.rank, session.world)
        self.step = 0
        self.store = CheckpointStore(session.run_url, cfg.checkpoint.storage_options)
        self.tb = RunWriter(session.run_url, cfg.logging.tensorboard_dir, cfg.checkpoint.storage_options, session.rank)
        self.amp = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if cfg.train.precision == "bf16" else nullcontext())
        self._restore()

    # ------------------------------------------------------------------ checkpoints

    def _restore(self) -> None:
        ckpt = choose_resume(self.store, self.cfg.checkpoint, self.session.launch_id, self.session.world)
        if ckpt is None:
            return
        with scratch_dir("mqscale-restore-") as d:
            self.store.download(ckpt, d)
            st = torch.load(d / STATE, map_location=self.device, weights_only=True)
            self.model.load_state_dict(load_file(str(d / WEIGHTS)))
        self.loss.discriminator.load_state_dict(st["discriminator"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.step = int(st["step"])
        torch.set_rng_state(st["rng"])  # code restarts draw from it: resume exactly
        if "rng_cuda" in st and torch.cuda.is_available():  # (on a GPU they draw from this one)
            torch.cuda.set_rng_state(st["rng_cuda"])
        # rank 0's position: every rank has handed out as many batches (they step together)
        self.loader.load_state_dict(dict(st["loader"], rank=self.session.rank))
        log.info("resumed from %s at step %d", ckpt.url, self.step)

    def _checkpoint(self, metrics: dict) -> None:
        """Rank 0 stages the export and the training state; every rank takes part in the commit."""
        with scratch_dir("mqscale-ckpt-") as d:
            if self.session.rank == 0:
                TOKENIZER.save(self.model, self.cfg, d, source=f"train_tokenizer:{self.cfg.name}:step{self.step}")
                torch.save({"step": self.step,
                            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                            "discriminator": self.loss.discriminator.state_dict(),
                            "loader": self.loader.state_dict(), "rng": torch.get_rng_state(),
                            **({"rng_cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})},
                           d / STATE)
            commit_checkpoint(self.session, self.store, d if self.session.rank == 0 else None, self.step, metrics,
                              {"name": self.cfg.name})
        self.tb.sync()

    # ------------------------------------------------------------------ the step

    def train_step(self, batch: dict) -> dict[str, torch.Tensor | float]:
        """One generator (and, from ``disc_start``, discriminator) step on this rank's valid rows.

        Every rank makes the same collectives in the same order whatever its batch holds: a rank
        whose batch is all padding (its share of the epoch ran out, or nothing decoded) runs one
        padding row with weight 0, which moves neither the codebook, nor its BatchNorm
        statistics, nor (after the gradient all-reduce) the weights. Each rank's loss is scaled
        by its share of the step's valid images, so the averaged gradient is the mean over all
        valid images of all ranks. When no rank holds a valid image the optimizers do not step.
        The logs are 0-dim device tensors (``lr`` a float): ``host_floats`` reads them.
        """
        x, n = valid_images(batch, self.device)
        weight = torch.full((x.shape[0],), 1.0 if n else 0.0, device=self.device)
        mean_n = dist.all_reduce_mean({"n": float(n)}, self.device)["n"] if self.session.world > 1 else float(n)
        self._share = n / mean_n if n else 0.0      # this rank's weight in the mean over ranks
        self._any_valid = mean_n > 0
        lr = learning_rate(self.cfg, self.session.world, self.step)
        for opt in (self.opt_g, self.opt_d):
            for g in opt.param_groups:
                g["lr"] = lr
        with _frozen_batchnorm_stats(self.model, self.loss.discriminator, frozen=not n):
            with self.amp:
                out = self.model(x, update=True, weight=weight)
                loss, logs = self.loss.generator(x, out.recon, out.commit_loss, weight, self.step,
                                                 self.model.decoder.last_layer)
            if mean_n > 0:
                self.opt_g.zero_grad(set_to_none=True)
                (loss * self._share).backward()
                dist.average_gradients(self.model.parameters())
                if self.cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
                self.opt_g.step()
            if self.loss.gan_active(self.step):
                with self.amp:
                    d_loss, d_logs = self.loss.discriminator_loss(x, out.recon, weight)
                if mean_n > 0:
                    self.opt_d.zero_grad(set_to_none=True)
                    (d_loss * self._share).backward()
                    dist.average_gradients(self.loss.discriminator.parameters())
                    self.opt_d.step()
                logs.update(d_logs)
        used, ppl = self.model.quantize.usage(out.encoded.codes)
        logs.update({"codebook/usage": used, "codebook/perplexity": ppl, "codebook/restarts": out.restarts,
                     "psnr": psnr(x, out.recon.detach().float().clamp(-1, 1)), "lr": lr})
        self._last = (x[:8].detach(), out)
        return logs

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg, t0, images = self.cfg, time.perf_counter(), 0
        every = cfg.checkpoint.every_steps or math.inf
        logs: dict = {}
        while self.step < cfg.train.max_steps:
            for batch in self.loader:
                logs = self.train_step(batch)
                images += int(batch["mask"].sum())
                self.step += 1
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.max_steps:
                    self._log(self._reduce_logs(logs), images * self.session.world / (time.perf_counter() - t0))
                if cfg.logging.image_every and self.step % cfg.logging.image_every == 0:
                    self._log_images()
                done = self.step >= cfg.train.max_steps
                if done or self.step % every == 0:
                    self._checkpoint({"step": self.step, **host_floats(logs)})
                if done:
                    break
        self._log_images()
        self.tb.close()
        return {"step": self.step, **host_floats(logs)}

    def _reduce_logs(self, logs: dict) -> dict[str, float]:
        """The step's logs as floats, averaged over ranks, each rank weighted by its valid images
        (a padding-only rank's numbers, computed on a padding row, count for nothing)."""
        if self.session.world == 1:
            return host_floats(logs)
        share = self._share if self._any_valid else 1.0   # shares average to 1 over ranks
        return dist.all_reduce_mean({k: v if k == "lr" else v * share for k, v in logs.items()}, self.device)

    def _log(self, logs: dict[str, float], images_per_s: float) -> None:
        stats = self.loader.stats()
        if self.session.rank != 0:
            return
        self.tb.scalars(self.step, {**logs, "perf/images_per_s": images_per_s,
                                    **{f"data/{k}": stats[k] for k in ("invalid_samples", "undecodable",
                                                                       "corrupt_shards", "refused_members", "padding")}})
        log.info("step %d  g %.4f  psnr %.2f  usage %.2f  %.1f img/s", self.step,
                 logs.get("loss/total_g", float("nan")), logs.get("psnr", float("nan")),
                 logs.get("codebook/usage", float("nan")), images_per_s)

    def _log_images(self) -> None:
        if self.session.rank != 0 or not hasattr(self, "_last"):
            return
        x, out = self._last
        n = x.shape[0]
        grid = mask_grid(x, out.encoded.scores[:n], out.encoded.positions[:n], out.recon[:n].detach(),
                         self.cfg.model.grid)
        self.tb.image(self.step, "samples/input|importance|kept|reconstruction", grid)


def train_tokenizer(cfg: TokenizerRunConfig, session: Session) -> dict:
    return TokenizerTrainer(cfg, session).fit()
