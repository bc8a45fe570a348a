"""Tokenizer training: losses, LPIPS loading, the loop with checkpoints/resume and TensorBoard."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mqscale.core.checkpoint import MARKER
from mqscale.core.errors import ConfigError
from mqscale.core.session import StorageSession
from mqscale.models.lpips import LPIPS, load_lpips
from mqscale.models.mqvae.model import MQVAE
from mqscale.tokenize.jobs import Options
from mqscale.tokenize.pool import run as tokenize_run
from mqscale.tokenizer.config import TOKENIZER, LossConfig, load_tokenizer_config
from mqscale.tokenizer.loss import VQGANLoss
from mqscale.tokenizer.trainer import TokenizerTrainer, host_floats, train_tokenizer
from mqscale.train.config import load_train_config
from mqscale.train.verify import main as verify_main
from mqscale.train.verify import verify_url


@pytest.mark.slow
def test_lpips_is_a_distance_with_gradients():
    torch.manual_seed(0)
    lp = LPIPS()
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).requires_grad_(True)
    assert torch.allclose(lp(a, a), torch.zeros(2), atol=1e-6)
    d = lp(a, b)
    assert (d > 0).all()
    d.sum().backward()
    assert b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lp.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_lpips_weights_load_from_files(tmp_path, fmt):
    torch.manual_seed(1)
    src = LPIPS()
    for p in src.parameters():
        p.data.normal_()
    sd = src.state_dict()
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    if fmt == "safetensors":
        save_file(vgg, str(tmp_path / "vgg.safetensors"))
        save_file(lin, str(tmp_path / "lin.safetensors"))
        paths = (str(tmp_path / "vgg.safetensors"), str(tmp_path / "lin.safetensors"))
    else:
        torch.save(vgg, tmp_path / "vgg16.pth")
        torch.save(lin, tmp_path / "vgg.pth")
        paths = (str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    got = load_lpips(*paths)
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert torch.allclose(got(a, b), src(a, b))
    with pytest.raises(ValueError, match="not a VGG16 features"):
        load_lpips(paths[1], paths[1])


def _gan_case(seed=0, **cfg):
    torch.manual_seed(seed)
    loss = VQGANLoss(LossConfig(disc_start=2, disc_channels=16, disc_layers=2, **cfg), lpips=LPIPS())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    last = torch.nn.Parameter(torch.randn(3, 3))                 # stands in for the decoder's last layer
    recon = torch.einsum("bchw,cd->bdhw", x, last)
    return loss, x, last, recon


def _by_hand(loss, x, recon, last):
    """nll, -mean D(recon), and the adaptive weight, computed without VQGANLoss.generator."""
    nll = ((recon - x) ** 2).mean() + loss.lpips(x, recon).mean()
    g = -loss.discriminator(recon).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    return nll, g, (gn / (gg + 1e-4)).clamp(0.0, 1e4)


@pytest.mark.slow
def test_generator_loss_terms_and_adaptive_weight():
    loss, x, last, recon = _gan_case()
    commit = torch.tensor(0.1)
    w = torch.ones(2)
    before, logs = loss.generator(x, recon, commit, w, step=0, last_layer=last)
    assert "loss/gan_g" not in logs and "loss/perceptual" in logs
    nll, g, ratio = _by_hand(loss, x, recon, last)
    assert torch.allclose(before, nll + commit, rtol=1e-5)
    after, logs = loss.generator(x, recon, commit, w, step=5, last_layer=last)
    assert torch.allclose(logs["loss/adaptive_weight"], ratio, rtol=1e-4)
    gan_w = torch.clamp(ratio * 0.75, max=1.0)                   # disc_weight, then disc_weight_max
    assert torch.allclose(logs["loss/gan_weight"], gan_w, rtol=1e-4)
    assert torch.allclose(after, nll + commit + gan_w * g, rtol=1e-4)
    assert torch.allclose(logs["loss/gan_g"], g) and torch.allclose(logs["loss/total_g"], after)
    # the discriminator's hinge loss, by hand
    d, dlogs = loss.discriminator_loss(x, recon, w)
    real, fake = loss.discriminator(x).mean(dim=(1, 2, 3)), loss.discriminator(recon.detach()).mean(dim=(1, 2, 3))
    hinge = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    assert torch.allclose(d, hinge, rtol=1e-5) and torch.allclose(dlogs["disc/logits_real"], real.mean())
    # padding rows weigh nothing
    masked, _ = loss.generator(x, recon, commit, torch.tensor([1.0, 0.0]), step=0, last_layer=last)
    single, _ = loss.generator(x[:1], recon[:1], commit, torch.ones(1), step=0, last_layer=last)
    assert torch.allclose(masked, single, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("cap", [1.0, 0.3])
def test_gan_weight_is_capped_at_disc_weight_max(cap):
    """A nearly flat discriminator (the GAN phase's first steps): its gradient at the last layer is
    tiny, the ratio huge. The GAN term's weight is min(ratio * disc_weight, disc_weight_max)."""
    loss, x, last, recon = _gan_case(disc_weight_max=cap)
    final = loss.discriminator.main[-1]
    with torch.no_grad():
        final.weight.mul_(1e-4)
        final.bias.fill_(0.5)                                    # -mean D(recon) stays near -0.5
    commit = torch.tensor(0.1)
    nll, g, ratio = _by_hand(loss, x, recon, last)
    assert ratio * 0.75 > 10 * cap                               # the case: uncapped, GAN would dominate
    total, logs = loss.generator(x, recon, commit, torch.ones(2), step=5, last_layer=last)
    assert torch.allclose(logs["loss/adaptive_weight"], ratio, rtol=1e-4)
    assert logs["loss/gan_weight"].item() == pytest.approx(cap)
    assert torch.allclose(total, nll + commit + cap * g, rtol=1e-5)
    want = torch.autograd.grad(nll + cap * g, last, retain_graph=True)[0]
    total.backward()                                             # the capped weight is what trains
    assert torch.allclose(last.grad, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("value,why", [("0", "out of range"), ("-1", "out of range"), ("abc", "must be a number")])
def test_disc_weight_max_must_be_a_positive_number(value, why):
    with pytest.raises(ConfigError, match=f"loss.disc_weight_max: .*{why}"):
        load_tokenizer_config("configs/mqvae/debug.yaml", [f"loss.disc_weight_max={value}"])
    assert load_tokenizer_config("configs/mqvae/debug.yaml", ["loss.disc_weight_max=2"]).loss.disc_weight_max == 2.0


def test_official_default_caps_the_gan_weight_at_one():
    assert LossConfig().disc_weight_max == 1.0
    assert load_tokenizer_config("configs/mqvae/f8_r25.yaml").loss.disc_weight_max == 1.0


def test_l1_reconstruction_is_used_and_differs_from_l2():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = x + 0.5 * torch.randn_like(x)
    got = {}
    for kind in ("l1", "l2"):
        loss = VQGANLoss(LossConfig(recon=kind, perceptual_weight=0.0, disc_weight=0.0))
        total, logs = loss.generator(x, recon, torch.tensor(0.0), torch.ones(2), step=0, last_layer=None)
        got[kind] = logs["loss/pixel"]
        assert torch.allclose(total, logs["loss/pixel"])
    assert torch.allclose(got["l1"], (recon - x).abs().mean())
    assert torch.allclose(got["l2"], (recon - x).pow(2).mean())
    assert (got["l1"] - got["l2"]).abs() > 0.05


SHAPES = (96, 32)


def cfg(shapes, tmp, *extra):
    return load_tokenizer_config("configs/mqvae/debug.yaml", [
        f"data.train_url={shapes}", "data.num_workers=0", "data.resolution=32", "model.resolution=32",
        "data.batch_size=8", f"logging.tensorboard_dir={tmp}/tb", "logging.log_every=2", "logging.image_every=3",
        *extra])


@pytest.mark.slow
def test_loop_logs_checkpoints_and_resumes_exactly(shapes, tmp_path):
    c = cfg(shapes, tmp_path, "train.max_steps=6", "checkpoint.every_steps=3")
    res = train_tokenizer(c, StorageSession(str(tmp_path / "ckpt")))
    assert res["step"] == 6 and "codebook/usage" in res and "loss/disc" in res
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = ea.Tags()
    for t in ("loss/pixel", "loss/commit", "loss/gan_g", "loss/disc", "codebook/usage", "codebook/perplexity",
              "codebook/restarts", "psnr", "perf/images_per_s"):
        assert t in tags["scalars"], t
    assert [e.step for e in ea.Scalars("psnr")] == [2, 4, 6]
    assert "samples/input|importance|kept|reconstruction" in tags["images"]
    # the checkpoint is a tokenizer export
    tok, tcfg = TOKENIZER.load(tmp_path / "ckpt" / "checkpoint_000000006")
    assert tcfg.model.resolution == 32
    # resume from step 3 and run to 6: same weights as the uninterrupted run
    import shutil
    shutil.rmtree(tmp_path / "ckpt" / "checkpoint_000000006")
    again = TokenizerTrainer(cfg(shapes, tmp_path / "b", "train.max_steps=6", "checkpoint.every_steps=3"),
                             StorageSession(str(tmp_path / "ckpt")))
    assert again.step == 3
    again.fit()
    for (k, a), b in zip(tok.state_dict().items(), again.model.state_dict().values()):
        assert torch.allclose(a, b.cpu(), atol=1e-5), k


def test_missing_perceptual_weights_warn_once(shapes, tmp_path, caplog):
    c = cfg(shapes, tmp_path, "train.max_steps=1", "loss.perceptual_weight=1.0")
    with caplog.at_level("WARNING"):
        t = TokenizerTrainer(c, StorageSession(str(tmp_path / "ck")))
    assert t.loss.lpips is None
    assert sum("perceptual loss is off" in r.message for r in caplog.records) == 1


@pytest.mark.slow
def test_default_tensorboard_dir_is_the_runs_tb_folder_and_resume_never(shapes, tmp_path):
    """No logging.tensorboard_dir: events go beside the checkpoints, <checkpoint.dir>/<name>/tb,
    not to ./runs/<date> in the worker's working directory."""
    store = tmp_path / "store"
    c = cfg(shapes, tmp_path, "logging.tensorboard_dir=", f"checkpoint.dir={store}", "train.max_steps=2",
            "logging.image_every=0")
    run = c.checkpoint.run_url(c.name)
    train_tokenizer(c, StorageSession(run, launch_id="first"))
    ea = EventAccumulator(str(store / c.name / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("psnr")] == [2]
    # checkpoint.resume=never starts over, except from this launch's own checkpoints (a restart)
    for resume, launch, step in [("auto", "other", 2), ("never", "other", 0), ("never", "", 0), ("never", "first", 2)]:
        c2 = cfg(shapes, tmp_path / "again", f"checkpoint.resume={resume}", "train.max_steps=4")
        assert TokenizerTrainer(c2, StorageSession(run, launch_id=launch)).step == step, (resume, launch)


@pytest.mark.slow
def test_default_tensorboard_events_are_synced_to_remote_run_storage(shapes, tmp_path, s3):
    import json

    import s3fs
    c = cfg(shapes, tmp_path, "logging.tensorboard_dir=", "checkpoint.dir=s3://mqscale-test/tok-runs",
            f"checkpoint.storage_options={json.dumps(s3)}", "train.max_steps=2", "logging.image_every=0")
    t = TokenizerTrainer(c, StorageSession(c.checkpoint.run_url(c.name), c.checkpoint.storage_options))
    local = t.tb.dir
    t.fit()
    fs = s3fs.S3FileSystem(**s3)
    fs.invalidate_cache()
    events = fs.find(f"mqscale-test/tok-runs/{c.name}/tb")
    assert events and all("events.out.tfevents" in e for e in events)
    fs.get(events[0], str(tmp_path / "ev" / "events.out.tfevents.x"))
    ea = EventAccumulator(str(tmp_path / "ev"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("psnr")] == [2]
    assert not Path(local).exists()            # the local staging copy is gone


@pytest.mark.parametrize("key,unknown", [("logging.sample_every=5", "logging.sample_every"),
                                         ("logging.tokenizer=/x", "logging.tokenizer"),
                                         ("logging.peak_tflops=1.0", "logging.peak_tflops"),
                                         ("train.grad_accum=2", "train.grad_accum"), ("deepspeed.zero_stage=2", "deepspeed")])
def test_keys_tokenizer_training_does_not_read_are_unknown(key, unknown):
    """Stackformer-only keys (its sample-grid tokenizer, MFU peak, DeepSpeed, its old key names)
    are unknown keys in a tokenizer config, not silently ignored ones."""
    with pytest.raises(ConfigError, match=f"{unknown}: unknown key"):
        load_tokenizer_config("configs/mqvae/debug.yaml", [key])


def test_both_trainers_read_the_cadences_under_the_same_keys():
    """checkpoint.every_steps, logging.log_every and logging.image_every mean the same in both runs."""
    keys = ["checkpoint.every_steps=5", "logging.log_every=3", "logging.image_every=7", "checkpoint.resume_from=/x"]
    tok = load_tokenizer_config("configs/mqvae/debug.yaml", keys)
    sf = load_train_config("configs/stackformer/debug.yaml", keys)
    for c in (tok, sf):
        assert (c.checkpoint.every_steps, c.logging.log_every, c.logging.image_every) == (5, 3, 7)
        assert c.checkpoint.resume_from == "/x"
    assert type(tok.checkpoint) is type(sf.checkpoint)


@pytest.mark.slow
def test_learning_rate_scales_base_lr_by_the_total_batch_with_linear_warmup(shapes, tmp_path):
    from mqscale.tokenizer.trainer import learning_rate
    c = cfg(shapes, tmp_path, "optim.base_lr=4.5e-6", "optim.scale_lr=true", "optim.warmup_steps=4")
    peak = 4.5e-6 * 8 * 2                        # base_lr x (batch 8 per rank x 2 ranks), as VQGAN
    assert [learning_rate(c, 2, s) for s in range(6)] == pytest.approx(
        [peak / 4, peak / 2, 3 * peak / 4, peak, peak, peak])
    assert learning_rate(c, 1, 10) == pytest.approx(4.5e-6 * 8)
    c = cfg(shapes, tmp_path, "optim.base_lr=4.5e-6", "optim.scale_lr=false", "optim.warmup_steps=0")
    assert learning_rate(c, 4, 0) == pytest.approx(4.5e-6)
    # the trainer sets it on both optimizers at every step
    c = cfg(shapes, tmp_path, "optim.base_lr=1e-5", "optim.scale_lr=true", "optim.warmup_steps=3",
            "train.max_steps=2", "logging.image_every=0")
    t = TokenizerTrainer(c, StorageSession(str(tmp_path / "lr")))
    batch = next(iter(t.loader))
    for step in (0, 1):
        t.step = step
        logs = t.train_step(batch)
        want = 1e-5 * 8 * (step + 1) / 3
        assert logs["lr"] == pytest.approx(want)
        assert all(g["lr"] == pytest.approx(want) for o in (t.opt_g, t.opt_d) for g in o.param_groups)


@pytest.mark.slow
def test_a_padding_only_batch_moves_nothing(shapes, tmp_path):
    """All rows are holes (a rank past its share, or nothing decoded): no weight, codebook,
    BatchNorm statistic or optimizer state moves, and the step still runs through."""
    t = TokenizerTrainer(cfg(shapes, tmp_path, "train.max_steps=1"), StorageSession(str(tmp_path / "pad")))
    t.train_step(next(iter(t.loader)))            # optimizer state exists, the GAN is on
    batch = next(iter(t.loader))
    batch = dict(batch, mask=torch.zeros_like(batch["mask"]))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    disc = {k: v.clone() for k, v in t.loss.discriminator.state_dict().items()}
    opt_steps = [s["step"].clone() for s in t.opt_g.state.values()]
    logs = t.train_step(batch)
    assert "loss/disc" in logs and logs["loss/pixel"] == 0.0
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in t.loss.discriminator.state_dict().items():
        assert torch.equal(v, disc[k]), k
    assert [s["step"] for s in t.opt_g.state.values()] == opt_steps


@pytest.mark.slow
def test_trainer_uses_the_l1_reconstruction_loss_when_configured(shapes, tmp_path):
    t = TokenizerTrainer(cfg(shapes, tmp_path, "loss.recon=l1", "train.max_steps=1"), StorageSession(str(tmp_path / "l1")))
    logs = t.train_step(next(iter(t.loader)))
    x, out = t._last                                            # the step's 8 images and its forward
    diff = out.recon.detach().float() - x
    assert torch.allclose(logs["loss/pixel"], diff.abs().mean(), rtol=1e-5)
    assert not torch.allclose(logs["loss/pixel"], diff.pow(2).mean(), rtol=1e-2)


@pytest.mark.slow
def test_one_bf16_autocast_step_on_cpu_is_finite_and_moves_the_weights(shapes, tmp_path):
    """f8_r25 trains under bf16 autocast: one step of it (GAN and adaptive weight on) on the CPU."""
    t = TokenizerTrainer(cfg(shapes, tmp_path, "train.precision=bf16", "train.max_steps=1"),
                         StorageSession(str(tmp_path / "bf16")))
    gen = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    disc = {k: v.detach().clone() for k, v in t.loss.discriminator.named_parameters()}
    logs = host_floats(t.train_step(next(iter(t.loader))))
    assert t._last[1].recon.dtype == torch.bfloat16             # autocast was on
    for k in ("loss/pixel", "loss/nll", "loss/commit", "loss/gan_g", "loss/adaptive_weight", "loss/total_g",
              "loss/disc", "psnr", "codebook/perplexity"):
        assert math.isfinite(logs[k]), (k, logs[k])
    moved = [k for k, v in t.model.named_parameters() if not torch.equal(v, gen[k])]
    assert len(moved) > 0.9 * len(gen), sorted(set(gen) - set(moved))[:5]
    assert all(torch.isfinite(v).all() for v in t.model.parameters())
    assert any(not torch.equal(v, disc[k]) for k, v in t.loss.discriminator.named_parameters())


_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__")


@pytest.mark.slow
def test_a_training_step_reads_no_device_value_back_but_the_host_mask(shapes, tmp_path, monkeypatch):
    """On a GPU every read of a device value (``.item()``, ``int(t)``, ``if t:``) waits for the
    device. The step's mqscale code may read only the batch's host-side mask; logs stay tensors
    until a log step. Recorded here by wrapping those Tensor methods, with restarts and the GAN on."""
    t = TokenizerTrainer(cfg(shapes, tmp_path, "train.max_steps=1"), StorageSession(str(tmp_path / "sync")))
    batch = next(iter(t.loader))
    root = str(Path(__file__).resolve().parents[2] / "mqscale")
    seen = []

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(root):
                seen.append((Path(caller.f_code.co_filename).name, caller.f_code.co_name, name))
            return original(self, *a, **k)
        return read

    with monkeypatch.context() as mp:
        for name in _HOST_READS:
            mp.setattr(torch.Tensor, name, wrap(name))
        logs = t.train_step(batch)
    assert logs["codebook/restarts"] > 0                         # the restart path ran
    assert {"loss/gan_g", "loss/disc"} <= set(logs)
    assert {where for where in seen} == {("trainer.py", "valid_images", "__int__")}, seen
    assert all(isinstance(v, torch.Tensor) for k, v in logs.items() if k != "lr")
    floats = t._reduce_logs(logs)                               # the log step turns them into floats
    assert all(type(v) is float for v in floats.values()) and set(floats) == set(logs)
    assert floats["loss/pixel"] == pytest.approx(logs["loss/pixel"].item())


def test_the_main_job_trains_the_demo_tokenizer_for_the_steps_its_config_names():
    """configs/mqvae/demo.yaml is what the README's demo-tokenizer numbers were measured with; the
    main job (which passes train.max_steps itself) must train it for the same number of steps."""
    from mqscale.demo import DemoSettings
    demo = load_tokenizer_config("configs/mqvae/demo.yaml")
    assert demo.train.max_steps == DemoSettings.tokenizer_steps
    assert demo.model.commitment_beta == 0.0 and demo.loss.perceptual_weight == 0.0


@pytest.mark.slow
def test_tokenizer_checkpoints_verify_and_a_damaged_newest_falls_back(shapes, tmp_path):
    """Tokenizer runs keep the Stackformer's checkpoints: each has the marker, ``mqscale.checkpoint
    verify`` checks them, and resume skips a damaged newest one for the previous one."""
    run = tmp_path / "run"
    c = cfg(shapes, tmp_path, "train.max_steps=4", "checkpoint.every_steps=2", "logging.image_every=0")
    train_tokenizer(c, StorageSession(str(run)))
    records = verify_url(str(run))
    assert [(r["step"], r["ok"], r["world"]) for r in records] == [(4, True, 1), (2, True, 1)]
    newest = run / "checkpoint_000000004"
    assert json.loads((newest / MARKER).read_text())["files"].keys() >= {"model.safetensors", "config.json",
                                                                          "train_state.pt"}
    with open(newest / "model.safetensors", "r+b") as f:   # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    assert verify_main(["verify", str(newest)]) == 1
    damaged = verify_url(str(run))
    assert [(r["step"], r["ok"]) for r in damaged] == [(4, False), (2, True)]
    assert "has another sha256 than the marker" in damaged[0]["why"]
    again = TokenizerTrainer(cfg(shapes, tmp_path, "train.max_steps=6"), StorageSession(str(run)))
    assert again.step == 2


def test_an_old_tokenizer_checkpoint_still_loads_as_a_tokenizer(shapes, tmp_path):
    """Written before the marker and the shared keys: a Ray-named directory whose config.json holds
    the tokenizer's own cadence keys (train.log_every, train.image_every, train.checkpoint_every)."""
    d = tmp_path / "old-run" / "checkpoint_2026-11-20_10-00-00.000000"
    c = load_tokenizer_config("configs/mqvae/demo.yaml")
    TOKENIZER.save(MQVAE(c.model).eval(), c, d)
    meta = json.loads((d / "config.json").read_text())
    old = meta["config"]
    old["train"].update(log_every=old["logging"].pop("log_every"), image_every=old["logging"].pop("image_every"),
                        checkpoint_every=old["checkpoint"].pop("every_steps"))
    del old["checkpoint"]["resume_from"]
    (d / "config.json").write_text(json.dumps(meta))
    tok, loaded = TOKENIZER.load(d)
    assert (loaded.logging.log_every, loaded.logging.image_every) == (c.logging.log_every, c.logging.image_every)
    summary = tokenize_run(Options(tokenizer=str(d), input=shapes, output=str(tmp_path / "tokens")), workers=0,
                           progress=False)
    assert summary.sequences_out == 96
    # a new launch of that run starts over beside it, and never deletes it as a dead save of its own
    train_tokenizer(cfg(shapes, tmp_path, "train.max_steps=2", "logging.image_every=0"),
                    StorageSession(str(d.parent)))
    assert (d / "model.safetensors").is_file()
    records = {Path(r["url"]).name: r for r in verify_url(str(d.parent))}
    assert records["checkpoint_000000002"]["ok"]
    assert not records[d.name]["ok"] and "written before completion markers" in records[d.name]["why"]
