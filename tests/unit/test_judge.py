"""The quality judge: it tells the shapes apart on held-out images, does not learn labels that mean
nothing, its FD_judge separates real images from damaged ones, and a judge that does not fit the
job is refused with one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_tools.make_shapes import write_shapes
from mqscale.core.images import from_uint8
from mqscale.judge.config import JudgeTrainConfig
from mqscale.judge.metrics import accuracy, load_judge
from mqscale.judge.train import _gaussian_blur, fit, read_labelled, train_judge
from mqscale.models.judge import Judge, JudgeArgs

pytestmark = pytest.mark.slow   # a real judge trains (about half a minute)

RES = 32


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    train, held = str(root / "train"), str(root / "held")
    write_shapes(train, 2000, resolution=RES, shard_size=500, progress=False, variety="demo")
    write_shapes(held, 400, resolution=RES, shard_size=200, progress=False, variety="demo", start=10_000_000)
    return train, held, root


@pytest.fixture(scope="module")
def judged(sets):
    train, held, root = sets
    judge, summary = train_judge(train, root / "judge", held, RES, JudgeTrainConfig(epochs=6))
    return judge, summary


def test_the_judge_tells_held_out_shapes_apart(judged):
    judge, s = judged
    assert s["heldout_accuracy"] >= 0.97 and s["heldout_images"] == 400 and s["train_images"] == 2000
    assert s["worst_class_accuracy"] >= 0.85
    loaded = load_judge(judge.path, resolution=RES)                  # trusted: loads without complaint
    assert loaded.record.heldout_accuracy == pytest.approx(s["heldout_accuracy"])
    assert loaded.record.classes[:3] == ["circle", "square", "triangle"]


def test_shuffled_labels_teach_it_nothing(sets):
    """The same training on labels that mean nothing stays near chance on held-out images: the
    accuracy above is the shapes', not something the training procedure makes up."""
    train, held, _ = sets
    data, test = read_labelled(train, RES, limit=1000), read_labelled(held, RES)
    data.labels = data.labels[torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(1))]
    model = Judge(JudgeArgs(resolution=RES))
    fit(model, data, JudgeTrainConfig(epochs=6), torch.device("cpu"))
    with torch.no_grad():
        pred = model(from_uint8(test.images)).argmax(1)
    assert accuracy(pred, test.labels) < 0.2           # chance is 0.1


def test_fd_judge_separates_real_from_blurred_and_noisy(sets, judged):
    judge, s = judged
    _, held, _ = sets
    x = from_uint8(read_labelled(held, RES).images)
    real = judge.fd(judge.judge(x)[1])                 # the very images of the reference: near zero
    blurred = judge.fd(judge.judge(_gaussian_blur(x, torch.full((len(x),), 2.0)))[1])
    noisy = judge.fd(judge.judge((x + 0.3 * torch.randn_like(x)).clamp(-1, 1))[1])
    assert real < 0.05 * min(blurred, noisy), (real, blurred, noisy)
    # two halves of the held-out set (200 images each, 128 features: the estimate's own bias) stay
    # well below what blur does
    assert s["fd_floor"] < 0.5 * min(blurred, noisy), (s["fd_floor"], blurred, noisy)


def test_a_judge_that_does_not_fit_is_refused_with_one_line(judged, tmp_path):
    judge, _ = judged
    with pytest.raises(Exception, match=r"trained on 32 px images, the images to judge are 64 px") as e:
        load_judge(judge.path, resolution=64)
    assert "\n" not in str(e.value)
    with pytest.raises(Exception, match=r"trained on another dataset") as e:
        load_judge(judge.path, dataset_sha256="f" * 64)
    assert "\n" not in str(e.value)
    weak = tmp_path / "weak"
    weak.mkdir()
    for name in ("model.safetensors", "config.json"):
        (weak / name).write_bytes((Path(judge.path) / name).read_bytes())
    cfg = json.loads((weak / "config.json").read_text())
    cfg["config"]["heldout_accuracy"] = 0.5
    (weak / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"untrustworthy judge: held-out accuracy 0.500 is below 0.97"):
        load_judge(str(weak))
    cfg["format"] = "mqscale-stackformer/1"                          # a model of another kind
    (weak / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"holds a 'mqscale-stackformer/1' model, not a quality judge") as e:
        load_judge(str(weak))
    assert "\n" not in str(e.value)
