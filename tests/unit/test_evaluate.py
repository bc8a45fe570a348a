"""Evaluation: FID/IS math and code path, the FID Inception's weights, reference statistics, PSNR/SSIM,
tokenizer metrics, the generator job end to end, and the mask-ratio sweep."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mqscale.core.errors import InputError
from mqscale.core.images import psnr
from mqscale.evaluate.__main__ import main as evaluate_main
from mqscale.core.frechet import FeatureStats, frechet_distance
from mqscale.evaluate.fid import (
    INCEPTION_FILE,
    extract,
    inception_score,
    load_inception,
)
from mqscale.evaluate.generation import reference_stats
from mqscale.evaluate.image_metrics import ssim
from mqscale.models.inception import InceptionV3
from tests.helpers.exports import export_pair, text_pair, word_tokenizer


def random_inception_file(path: Path, seed: int = 0) -> str:
    """An Inception-shaped network with random weights, saved under the official key names. Kaiming
    init keeps activations O(1) through the 94 convolutions (the default init shrinks them to ~1e-8)."""
    torch.manual_seed(seed)
    m = InceptionV3()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}  # as in the file
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return random_inception_file(tmp_path_factory.mktemp("inc") / INCEPTION_FILE)


SHAPES = (48, 24)


def images_u8(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 32, 32), generator=g)
    return (x + shift).clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------ FID / IS math


def numpy_frechet(mu1, s1, mu2, s2):
    """The textbook formula with the eigenvalues of the (non-symmetric) product S1 S2."""
    ev = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev.real.clip(0)).sum())


def test_frechet_distance_equals_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 32))
    b = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    sa, sb = FeatureStats.of(a), FeatureStats.of(b)
    assert np.allclose(sa.mu, a.mean(0)) and np.allclose(sa.sigma, np.cov(a, rowvar=False))
    ours = frechet_distance(sa, sb)
    assert ours == pytest.approx(numpy_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-6)
    assert frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-8)


def test_inception_score_of_known_distributions():
    uniform = np.zeros((100, 10))
    assert inception_score(uniform, splits=5)[0] == pytest.approx(1.0)
    confident = np.full((100, 10), -1e4)
    confident[np.arange(100), np.arange(100) % 10] = 0.0   # every class equally often, each image sure
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_fid_code_path_of_a_set_against_itself_and_a_shifted_set(inception_file):
    net, _ = load_inception(inception_file, input_size=75)
    a = images_u8(16, 0)
    fa, _ = extract(net, [a[:8], a[8:]])
    fb, _ = extract(net, [a])
    fs, _ = extract(net, [images_u8(16, 0, shift=60)])
    same = frechet_distance(FeatureStats.of(fa), FeatureStats.of(fb))
    shifted = frechet_distance(FeatureStats.of(fa), FeatureStats.of(fs))
    assert same < 1e-6 * max(1.0, shifted) and shifted > 0
    assert fa.shape == (16, 2048)


# ------------------------------------------------------------------ the Inception's weights


@pytest.mark.slow
def test_inception_has_the_published_architecture_and_key_names():
    m = InceptionV3()
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == 23_850_960   # torchvision's v3 with 1008 classes, no aux
    assert sd["fc.weight"].shape == (1008, 2048)
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch5x5_2.bn.running_var", "Mixed_6e.branch7x7dbl_5.conv.weight",
                "Mixed_7a.branch7x7x3_4.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.bias"):
        assert key in sd
    f, logits = m.eval()(torch.zeros(1, 3, 40, 40, dtype=torch.uint8))
    assert f.shape == (1, 2048) and logits.shape == (1, 1008)


def test_inception_weights_are_needed_and_named_when_missing(tmp_path):
    with pytest.raises(InputError, match=INCEPTION_FILE.replace(".", r"\.")):
        load_inception("")
    with pytest.raises(InputError, match="does not exist"):
        load_inception(str(tmp_path / "nope.pth"))
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not the FID Inception weights"):
        load_inception(str(tmp_path / "other.pth"))


def test_a_pickled_object_in_the_weights_file_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").write_text, ("x",))
    torch.save({"obj": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="not a readable weights file"):
        load_inception(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ reference statistics


@pytest.mark.slow
def test_reference_statistics_are_computed_once_stored_beside_the_shards_and_checked(inception_file, shapes):
    net, sha = load_inception(inception_file, input_size=75)
    logs = []
    first = reference_stats(shapes, net, sha, 32, 40, 16, log=logs.append)
    stored = sorted(Path(shapes, "fid_stats").iterdir())
    assert [p.suffix for p in stored] == [".json", ".npz"] and first.n == 40
    meta = json.loads(stored[0].read_text())
    assert meta["inception_sha256"] == sha and meta["images"] == 40 and len(meta["npz_sha256"]) == 64
    mtime = stored[1].stat().st_mtime_ns
    again = reference_stats(shapes, net, sha, 32, 40, 16, log=logs.append)
    assert "checksum verified" in logs[-1] and stored[1].stat().st_mtime_ns == mtime
    assert np.array_equal(again.sigma, first.sigma)
    raw = bytearray(stored[1].read_bytes())            # damage the stored statistics
    raw[-40] ^= 0xFF
    stored[1].write_bytes(bytes(raw))
    reference_stats(shapes, net, sha, 32, 40, 16, log=logs.append)
    assert "images in" in logs[-1]                      # recomputed, not trusted


# ------------------------------------------------------------------ PSNR / SSIM


def test_psnr_and_ssim_on_known_images():
    a = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    b = torch.full((1, 3, 16, 16), 110, dtype=torch.uint8)
    assert psnr(a, b, data_range=255, per_image=True).item() == pytest.approx(10 * np.log10(255 ** 2 / 100))
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b).item() == pytest.approx((2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1))
    x = images_u8(2, 3)[:, :, :16, :16]
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64)) and torch.isinf(psnr(x, x, data_range=255, per_image=True)).all()


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM with explicit loops over windows and channels."""
    from mqscale.evaluate.image_metrics import gaussian_window
    w = gaussian_window().numpy()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                px, py = x[ch, i:i + 11, j:j + 11], y[ch, i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_loop_implementation_on_random_images():
    x = images_u8(1, 4)[:, :, :14, :15]
    y = (x.int() + torch.randint(-30, 30, x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    y = y.to(torch.uint8)
    ref = reference_ssim(x[0].double().numpy(), y[0].double().numpy())
    assert ssim(x, y).item() == pytest.approx(ref, rel=1e-9)


# ------------------------------------------------------------------ the evaluate command


@pytest.fixture(scope="module")
def pair(tmp_path_factory, shapes):
    return export_pair(tmp_path_factory.mktemp("pair"), f"data.train_url={shapes}")


def evaluate(tmp_path, *args):
    return evaluate_main(["--config", "configs/eval/debug.yaml", f"logging.tensorboard_dir={tmp_path}/tb",
                          "--out", str(tmp_path / "out"), *args])


def hparams_metrics(tb: Path) -> set[str]:
    ea = EventAccumulator(str(tb))
    ea.Reload()
    return set(ea.Tags()["scalars"]) | ({"hparams"} if "hparams" in ea.Tags().get("tensors", []) or
                                        ea.PluginTagToContent("hparams") else set())


def results(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "results.json").read_text())


def run_tb(tmp_path: Path) -> Path:
    """The TensorBoard directory of the run whose results are in ``tmp_path/out``: its own, under the root."""
    tb = Path(results(tmp_path)["tensorboard"])
    assert tb.parent == tmp_path / "tb" and tb.is_dir()
    return tb


def session_hparams(tb: Path) -> dict:
    """The hparams of the one session in ``tb``, read back through tensorboard's reader."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    ea = EventAccumulator(str(tb))
    ea.Reload()
    for raw in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                    for k, v in data.session_start_info.hparams.items()}
    raise AssertionError(f"{tb}: no hparams session")


def scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(tb))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


@pytest.mark.slow
def test_tokenizer_metrics_json_mask_map_and_tensorboard(pair, shapes, tmp_path, inception_file, capsys):
    _, tok = pair
    assert evaluate(tmp_path, "--tokenizer", tok, "--data", shapes, "eval.num_images=20",
                    f"eval.inception_weights={inception_file}", "eval.inception_size=75") == 0
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    m = rec["metrics"]
    assert rec["job"] == "tokenizer" and m["images"] == 20 and m["seq_len"] == 16
    assert 0 < m["psnr"] < 60 and -1 <= m["ssim"] <= 1 and 0 < m["codebook_usage"] <= 1 and m["rfid"] >= 0
    assert 1 <= m["codebook_perplexity"] <= 256
    assert np.isclose(np.array(rec["mask_map"]).sum(), 16)     # each image keeps 16 cells
    Image.open(tmp_path / "out" / "mask_map.png").verify()
    tags = hparams_metrics(run_tb(tmp_path))
    assert {"eval/psnr", "eval/ssim", "eval/rfid", "eval/codebook_usage", "hparams"} <= tags
    assert "LPIPS" in capsys.readouterr().out                 # says what it could not measure


@pytest.mark.slow
def test_generator_fid_and_is_end_to_end(pair, shapes, tmp_path, inception_file, capsys):
    model, tok = pair
    args = ["--tokenizer", tok, "--data", shapes, "--model", model, "eval.num_samples=24",
            "eval.num_reference=40", "eval.is_splits=2", f"eval.inception_weights={inception_file}",
            "eval.inception_size=75", "--cfg-scale", "1.5", "--code-top-k", "50"]
    assert evaluate(tmp_path, *args) == 0
    m = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert m["images"] == 24 and m["reference_images"] == 40 and m["fid"] > 0 and m["is"] >= 1
    out = capsys.readouterr().out
    assert "FID" in out and "reference statistics:" in out   # computed here or by an earlier test: same key
    assert {"eval/fid", "eval/is", "hparams"} <= hparams_metrics(run_tb(tmp_path))


def test_generator_without_inception_weights_names_the_file(pair, shapes, tmp_path, capsys):
    model, tok = pair
    assert evaluate(tmp_path, "--tokenizer", tok, "--data", shapes, "--model", model) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and INCEPTION_FILE in err and "eval.inception_weights" in err


@pytest.mark.integration
def test_mask_ratio_sweep_writes_its_table_and_plot(pair, shapes, tmp_path, capsys):
    _, tok = pair
    assert evaluate(tmp_path, "--tokenizer", tok, "--data", shapes, "eval.num_images=12",
                    "--sweep", "mask_ratio=0.125,0.25,0.5", "--speed-batch", "4") == 0
    table = (tmp_path / "out" / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| mask ratio | L | PSNR (dB) | SSIM |") and len(table) == 5
    assert [row.split("|")[2].strip() for row in table[2:]] == ["8", "16", "32"]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["seq_len"] for r in rows] == [8, 16, 32] and all(r["sampling_images_per_s"] > 0 for r in rows)
    img = Image.open(tmp_path / "out" / "sweep.png")
    assert img.format == "PNG" and img.size[0] > 400
    tb = run_tb(tmp_path)                  # one hparams session per ratio, with that row as its metrics
    assert sorted(p.name for p in tb.iterdir() if p.is_dir()) == [f"mask_ratio={r:g}" for r in (0.125, 0.25, 0.5)]
    for r in rows:
        sub = tb / f"mask_ratio={r['mask_ratio']:g}"
        hp = session_hparams(sub)
        assert hp["mask_ratio"] == pytest.approx(r["mask_ratio"]) and hp["seq_len"] == r["seq_len"]
        assert hp["job"] == "sweep"
        got = scalars(sub)
        for k in ("psnr", "ssim", "codebook_usage", "sampling_images_per_s"):
            assert got[f"eval/{k}"][0][1] == pytest.approx(r[k], rel=1e-6)
    curve = scalars(tb)["eval/psnr"]        # and the run's scalars over L: the trade-off as a plot
    assert curve == [(r["seq_len"], pytest.approx(r["psnr"], rel=1e-6)) for r in rows]


def test_sweep_with_a_tokenizer_per_ratio_checks_the_ratios(pair, shapes, tmp_path, capsys):
    _, tok = pair
    assert evaluate(tmp_path, "--tokenizer", f"0.25={tok}", "--data", shapes, "--sweep", "mask_ratio=0.25,0.5") == 2
    assert "names ratios [0.25]" in capsys.readouterr().err


@pytest.mark.slow
def test_every_run_gets_its_own_results_and_tensorboard_directory(pair, shapes, tmp_path, monkeypatch, capsys):
    """Two runs with the same config compare side by side: nothing is shared or overwritten."""
    _, tok = pair
    config = str(Path(__file__).resolve().parents[2] / "configs" / "eval" / "debug.yaml")
    monkeypatch.chdir(tmp_path)

    def once(*extra):
        return evaluate_main(["--config", config, f"logging.tensorboard_dir={tmp_path}/tb", "--tokenizer", tok,
                              "--data", shapes, "eval.num_images=4", *extra])
    assert once() == 0 and once() == 0
    runs = sorted(Path("runs/eval").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("eval-debug-tokenizer-") for r in runs)
    recs = [json.loads((r / "results.json").read_text()) for r in runs]
    assert [rec["run"] for rec in recs] == [r.name for r in runs]
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == [r.name for r in runs]
    for r in runs:
        assert {"eval/psnr", "hparams"} <= hparams_metrics(tmp_path / "tb" / r.name)
    assert once("--run-name", "baseline") == 0
    assert (tmp_path / "runs/eval/baseline/results.json").is_file() and (tmp_path / "tb/baseline").is_dir()
    capsys.readouterr()
    assert once("--run-name", "../up") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--run-name" in err


def random_lpips_files(d: Path, seed: int = 1) -> tuple[str, str]:
    """Random VGG16 features in torchvision's layout (a tensors-only torch file) and random
    non-negative heads in the lpips package's layout (safetensors): mqscale/models/lpips.py's formats."""
    from safetensors.torch import save_file

    from mqscale.models.lpips import CHANNELS, LPIPS
    torch.manual_seed(seed)
    m = LPIPS()
    with torch.no_grad():
        for mod in m.features:
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                mod.bias.uniform_(-0.1, 0.1)
    torch.save({k: v for k, v in m.state_dict().items() if k.startswith("features.")}, d / "vgg16.pth")
    save_file({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) / c for i, c in enumerate(CHANNELS)},
              str(d / "vgg.safetensors"))
    return str(d / "vgg16.pth"), str(d / "vgg.safetensors")


@pytest.mark.slow
def test_lpips_through_evaluate_with_weights_files(pair, shapes, tmp_path, capsys):
    from mqscale.data.loader import iter_images
    from mqscale.models.lpips import load_lpips
    from mqscale.tokenizer.config import TOKENIZER
    _, tok = pair
    vgg, lin = random_lpips_files(tmp_path)
    assert evaluate(tmp_path, "--tokenizer", tok, "--data", shapes, "eval.num_images=10",
                    f"eval.vgg_weights={vgg}", f"eval.lpips_weights={lin}") == 0
    m = results(tmp_path)["metrics"]
    lp, model = load_lpips(vgg, lin), TOKENIZER.load(tok, "cpu")[0]
    with torch.no_grad():
        want = []
        for x in iter_images(shapes, 32, 10, 4):
            enc = model.encode(x)
            want.append(lp(x, model.decode(enc.codes, enc.positions).float().clamp(-1, 1)))
    assert m["lpips"] > 0 and m["lpips"] == pytest.approx(float(torch.cat(want).mean()), rel=1e-4)
    out = capsys.readouterr().out
    assert "lpips" in out and "LPIPS" not in out.split("not measured", 1)[-1]
    assert "eval/lpips" in hparams_metrics(run_tb(tmp_path))
    capsys.readouterr()
    assert evaluate(tmp_path, "--tokenizer", tok, "--data", shapes, f"eval.vgg_weights={lin}",
                    f"eval.lpips_weights={lin}") == 2          # heads given as the VGG file: named, one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a VGG16 features state dict" in err and lin in err


@pytest.mark.slow
def test_generator_refuses_a_text_tokenizer_other_than_the_training_shards(shapes, tmp_path, inception_file, capsys):
    from mqscale.tokenize.text import load_text_tokenizer
    model, tok = text_pair(tmp_path / "pair", shapes)          # shards made with the byte tokenizer
    words = word_tokenizer(tmp_path / "words.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small square\n")
    capsys.readouterr()
    assert evaluate(tmp_path, "--tokenizer", tok, "--data", shapes, "--model", model, "--prompts", str(prompts),
                    "--text-tokenizer", words, f"eval.inception_weights={inception_file}",
                    "eval.inception_size=75") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and load_text_tokenizer("bytes").identity in err
    assert not (tmp_path / "out" / "results.json").exists()
