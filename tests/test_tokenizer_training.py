"""Tokenizer training: losses, LPIPS loading, the loop with checkpoints/resume and TensorBoard."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.make_shapes import write_shapes
from mqscale.config import ConfigError
from mqscale.convert.export import load_exported
from mqscale.models.lpips import LPIPS, load_lpips
from mqscale.tokenizer_config import LossConfig, load_tokenizer_config
from mqscale.train.session import LocalSession
from mqscale.train.tokenizer_trainer import TokenizerTrainer, train_tokenizer
from mqscale.train.vqgan_loss import VQGANLoss


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


def test_generator_loss_terms_and_adaptive_weight():
    torch.manual_seed(0)
    loss = VQGANLoss(LossConfig(disc_start=2, disc_channels=16, disc_layers=2), lpips=LPIPS())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    last = torch.nn.Parameter(torch.randn(3, 3))
    recon = torch.einsum("bchw,cd->bdhw", x, last)
    commit = torch.tensor(0.1)
    w = torch.ones(2)
    before, logs = loss.generator(x, recon, commit, w, step=0, last_layer=last)
    assert "loss/gan_g" not in logs and "loss/perceptual" in logs
    after, logs = loss.generator(x, recon, commit, w, step=5, last_layer=last)
    assert "loss/gan_g" in logs and 0 <= logs["loss/adaptive_weight"] <= 1e4
    d, dlogs = loss.discriminator_loss(x, recon, w)
    assert d.item() > 0 and "disc/logits_real" in dlogs
    # padding rows weigh nothing
    masked, _ = loss.generator(x, recon, commit, torch.tensor([1.0, 0.0]), step=0, last_layer=last)
    single, _ = loss.generator(x[:1], recon[:1], commit, torch.ones(1), step=0, last_layer=last)
    assert torch.allclose(masked, single, atol=1e-6)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shapes32"))
    write_shapes(d, 96, resolution=32, shard_size=32, progress=False)
    return d


def cfg(shapes, tmp, *extra):
    return load_tokenizer_config("configs/mqvae/debug.yaml", [
        f"data.train_url={shapes}", "data.num_workers=0", "data.resolution=32", "model.resolution=32",
        "data.batch_size=8", f"logging.tensorboard_dir={tmp}/tb", "train.log_every=2", "train.image_every=3",
        *extra])


def test_loop_logs_checkpoints_and_resumes_exactly(shapes, tmp_path):
    c = cfg(shapes, tmp_path, "train.max_steps=6", "train.checkpoint_every=3")
    res = train_tokenizer(c, LocalSession(str(tmp_path / "ckpt")))
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
    tok, tcfg = load_exported(tmp_path / "ckpt" / "checkpoint_000000006", expect="mqvae")
    assert tcfg.model.resolution == 32
    # resume from step 3 and run to 6: same weights as the uninterrupted run
    import shutil
    shutil.rmtree(tmp_path / "ckpt" / "checkpoint_000000006")
    again = TokenizerTrainer(cfg(shapes, tmp_path / "b", "train.max_steps=6", "train.checkpoint_every=3"),
                             LocalSession(str(tmp_path / "ckpt")))
    assert again.step == 3
    again.fit()
    for (k, a), b in zip(tok.state_dict().items(), again.model.state_dict().values()):
        assert torch.allclose(a, b.cpu(), atol=1e-5), k


def test_missing_perceptual_weights_warn_once(shapes, tmp_path, caplog):
    c = cfg(shapes, tmp_path, "train.max_steps=1", "loss.perceptual_weight=1.0")
    with caplog.at_level("WARNING"):
        t = TokenizerTrainer(c, LocalSession(str(tmp_path / "ck")))
    assert t.loss.lpips is None
    assert sum("perceptual loss is off" in r.message for r in caplog.records) == 1


def test_default_tensorboard_dir_is_the_runs_tb_folder_and_resume_never(shapes, tmp_path):
    """No logging.tensorboard_dir: events go beside the checkpoints, <checkpoint.dir>/<name>/tb,
    not to ./runs/<date> in the worker's working directory."""
    store = tmp_path / "store"
    c = cfg(shapes, tmp_path, "logging.tensorboard_dir=", f"checkpoint.dir={store}", "train.max_steps=2",
            "train.image_every=0")
    train_tokenizer(c, LocalSession(str(tmp_path / "ckpt")), launch_id="first")
    ea = EventAccumulator(str(store / c.name / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("psnr")] == [2]
    # checkpoint.resume=never starts over, except from this launch's own checkpoints (a restart)
    for resume, launch, step in [("auto", "other", 2), ("never", "other", 0), ("never", "", 0), ("never", "first", 2)]:
        c2 = cfg(shapes, tmp_path / "again", f"checkpoint.resume={resume}", "train.max_steps=4")
        assert TokenizerTrainer(c2, LocalSession(str(tmp_path / "ckpt")), launch).step == step, (resume, launch)


def test_default_tensorboard_events_are_synced_to_remote_run_storage(shapes, tmp_path, s3):
    import json
    import s3fs
    c = cfg(shapes, tmp_path, "logging.tensorboard_dir=", "checkpoint.dir=s3://mqscale-test/tok-runs",
            f"checkpoint.storage_options={json.dumps(s3)}", "train.max_steps=2", "train.image_every=0")
    t = TokenizerTrainer(c, LocalSession(str(tmp_path / "ckpt")))
    local = t.tb_dir
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


@pytest.mark.parametrize("key", ["checkpoint.every_steps=5", "checkpoint.resume_from=/x", "logging.log_every=5",
                                 "logging.sample_every=5", "logging.tokenizer=/x", "logging.peak_tflops=1.0"])
def test_keys_tokenizer_training_does_not_read_are_unknown(key):
    """The cadences live in train.* (log_every, image_every, checkpoint_every): one place each."""
    with pytest.raises(ConfigError, match=f"{key.split('=')[0]}: unknown key"):
        load_tokenizer_config("configs/mqvae/debug.yaml", [key])


def test_learning_rate_scales_base_lr_by_the_total_batch_with_linear_warmup(shapes, tmp_path):
    from mqscale.train.tokenizer_trainer import learning_rate
    c = cfg(shapes, tmp_path, "optim.base_lr=4.5e-6", "optim.scale_lr=true", "optim.warmup_steps=4")
    peak = 4.5e-6 * 8 * 2                        # base_lr x (batch 8 per rank x 2 ranks), as VQGAN
    assert [learning_rate(c, 2, s) for s in range(6)] == pytest.approx(
        [peak / 4, peak / 2, 3 * peak / 4, peak, peak, peak])
    assert learning_rate(c, 1, 10) == pytest.approx(4.5e-6 * 8)
    c = cfg(shapes, tmp_path, "optim.base_lr=4.5e-6", "optim.scale_lr=false", "optim.warmup_steps=0")
    assert learning_rate(c, 4, 0) == pytest.approx(4.5e-6)
    # the trainer sets it on both optimizers at every step
    c = cfg(shapes, tmp_path, "optim.base_lr=1e-5", "optim.scale_lr=true", "optim.warmup_steps=3",
            "train.max_steps=2", "train.image_every=0")
    t = TokenizerTrainer(c, LocalSession(str(tmp_path / "lr")))
    batch = next(iter(t.loader))
    for step in (0, 1):
        t.step = step
        logs = t.train_step(batch)
        want = 1e-5 * 8 * (step + 1) / 3
        assert logs["lr"] == pytest.approx(want)
        assert all(g["lr"] == pytest.approx(want) for o in (t.opt_g, t.opt_d) for g in o.param_groups)


def test_a_padding_only_batch_moves_nothing(shapes, tmp_path):
    """All rows are holes (a rank past its share, or nothing decoded): no weight, codebook,
    BatchNorm statistic or optimizer state moves, and the step still runs through."""
    t = TokenizerTrainer(cfg(shapes, tmp_path, "train.max_steps=1"), LocalSession(str(tmp_path / "pad")))
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


def test_the_main_job_trains_the_demo_tokenizer_for_the_steps_its_config_names():
    """configs/mqvae/demo.yaml is what the README's demo-tokenizer numbers were measured with; the
    main job (which passes train.max_steps itself) must train it for the same number of steps."""
    from mqscale.train.main_job import DemoData
    demo = load_tokenizer_config("configs/mqvae/demo.yaml")
    assert demo.train.max_steps == DemoData.tokenizer_steps == 600
    assert demo.model.commitment_beta == 0.0 and demo.loss.perceptual_weight == 0.0
