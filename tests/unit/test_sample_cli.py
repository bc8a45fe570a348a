"""python -m mqscale.sample: exported model + tokenizer -> PNG grid, seeded, guided, class names."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mqscale.generate.generator import ImageGenerator
from mqscale.generate.sample import main as sample_main
from mqscale.models.stackformer.sampling import DEFAULT_GUIDANCE
from tests.helpers.exports import export_pair, text_pair, word_tokenizer

SHAPES = (8, 8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, shapes):
    return export_pair(tmp_path_factory.mktemp("pair"), f"data.train_url={shapes}")


def run(pair, out, *extra):
    model, tok = pair
    return sample_main(["--model", model, "--tokenizer", tok, "--out", str(out), "--code-top-k", "50", *extra])


@pytest.mark.slow
def test_same_seed_same_images_and_another_seed_differs(pair, tmp_path):
    assert run(pair, tmp_path / "a.png", "--classes", "1,3", "-n", "3", "--per-image", "--seed", "5") == 0
    assert run(pair, tmp_path / "b.png", "--classes", "1,3", "-n", "3", "--per-image", "--seed", "5") == 0
    assert run(pair, tmp_path / "c.png", "--classes", "1,3", "-n", "3", "--per-image", "--seed", "6") == 0
    a = sorted((tmp_path / "a").glob("*.png"))
    assert len(a) == 6
    for p in a:
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    assert any(p.read_bytes() != (tmp_path / "c" / p.name).read_bytes() for p in a)
    grid = Image.open(tmp_path / "a.png")
    assert grid.size[0] > 3 * 64 and grid.size[1] >= 2 * 64   # 2 rows of 3, cells enlarged to >= 64 px


@pytest.mark.slow
def test_prints_images_per_second(pair, tmp_path, capsys):
    assert run(pair, tmp_path / "g.png", "--classes", "0", "-n", "2") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"2 images (16 tokens each, guidance {DEFAULT_GUIDANCE:g})") and "images/s on cpu" in line


@pytest.mark.slow
def test_default_guidance_is_the_documented_scale_and_0_turns_it_off(pair, tmp_path):
    """The model was trained with condition dropout, so no flag means guidance DEFAULT_GUIDANCE."""
    assert run(pair, tmp_path / "plain.png", "--classes", "2,4", "-n", "2", "--per-image") == 0
    assert run(pair, tmp_path / "zero.png", "--classes", "2,4", "-n", "2", "--per-image", "--cfg-scale", "0") == 0
    assert run(pair, tmp_path / "dflt.png", "--classes", "2,4", "-n", "2", "--per-image",
               "--cfg-scale", f"{DEFAULT_GUIDANCE:g}") == 0
    for p in sorted((tmp_path / "plain").glob("*.png")):
        assert p.read_bytes() == (tmp_path / "dflt" / p.name).read_bytes()
    assert any(p.read_bytes() != (tmp_path / "zero" / p.name).read_bytes()
               for p in (tmp_path / "plain").glob("*.png"))


def test_rows_carry_the_training_data_class_names(pair):
    from mqscale.generate.sample import conditions
    gen = ImageGenerator(*pair, device="cpu")

    class NS:
        classes, prompts, n, class_names, storage_options = "0,3", "", 2, "", {}
    cond, labels = conditions(gen, NS)
    assert cond.tolist() == [0, 0, 3, 3]
    from data_tools.make_shapes import KINDS
    assert labels == [f"0: {list(KINDS)[0]}", f"3: {list(KINDS)[3]}"]


@pytest.mark.parametrize("args,message", [
    (["--unconditional"], "class-conditional: use --classes"),
    (["--classes", "3,99"], "ids must lie in [0, 10)"),
    (["--classes", "a,b"], "class ids separated by commas"),
    (["--classes", "1", "--code-top-p", "0"], "--code-top-p in (0, 1]"),
])
def test_bad_requests_get_one_line(pair, tmp_path, capsys, args, message):
    assert run(pair, tmp_path / "x.png", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_guidance_refused_for_a_model_trained_without_condition_dropout(tmp_path, capsys):
    pair = export_pair(tmp_path, "train.p_uncond=0")
    assert run(pair, tmp_path / "x.png", "--classes", "1", "--cfg-scale", "2") == 2
    assert "train.p_uncond=0" in capsys.readouterr().err


def test_tokenizer_must_match_the_model(tmp_path, capsys):
    model, tok = export_pair(tmp_path, "model.seq_len=12")
    assert run((model, tok), tmp_path / "x.png", "--classes", "1") == 2
    assert "sequence length L 12" in capsys.readouterr().err


@pytest.mark.slow
def test_text_model_from_prompts_and_unconditional_model(tmp_path, capsys):
    model, tok = export_pair(tmp_path / "t", "model.cond=text", "model.text_len=8",
                             f"data.train_url={tmp_path / 'no-such-tokens'}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    assert run((model, tok), tmp_path / "t.png", "--prompts", str(prompts), "-n", "2", "--cfg-scale", "1.5") == 0
    assert "is not checked against the tokenizer the model was trained with" in capsys.readouterr().err
    model, tok = export_pair(tmp_path / "u", "model.cond=none", "train.p_uncond=0")
    assert run((model, tok), tmp_path / "u.png", "--unconditional", "-n", "5") == 0
    arr = np.array(Image.open(io.BytesIO((tmp_path / "u.png").read_bytes())))
    assert arr.ndim == 3 and arr.shape[2] == 3


@pytest.mark.slow
def test_text_tokenizer_defaults_to_the_training_shards_and_another_is_refused(shapes, tmp_path, capsys):
    from mqscale.tokenize.text import load_text_tokenizer
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large circle on a plain background\n")
    words = word_tokenizer(tmp_path / "words.json")
    bytes_id, words_id = load_text_tokenizer("bytes").identity, load_text_tokenizer(words).identity
    assert bytes_id != words_id

    def sample_text(pair, out, *extra):
        return run(pair, tmp_path / out, "--prompts", str(prompts), "-n", "2", "--per-image", *extra)

    def refused(pair, spec, theirs):
        capsys.readouterr()
        assert sample_text(pair, "x.png", "--text-tokenizer", spec) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--text-tokenizer {spec}" in err and theirs in err
        assert not (tmp_path / "x.png").exists()

    on_bytes = text_pair(tmp_path / "b", shapes)
    assert sample_text(on_bytes, "b.png") == 0 and sample_text(on_bytes, "b2.png", "--text-tokenizer", "bytes") == 0
    assert "not checked" not in capsys.readouterr().err
    for p in (tmp_path / "b").glob("*.png"):
        assert p.read_bytes() == (tmp_path / "b2" / p.name).read_bytes()
    refused(on_bytes, words, bytes_id)

    on_words = text_pair(tmp_path / "w", shapes, text_tokenizer=words)
    assert sample_text(on_words, "w.png") == 0          # the default is what the shards record: the JSON
    assert sample_text(on_words, "w2.png", "--text-tokenizer", words) == 0
    for p in (tmp_path / "w").glob("*.png"):
        assert p.read_bytes() == (tmp_path / "w2" / p.name).read_bytes()
    refused(on_words, "bytes", words_id)


def test_grid_and_images_go_to_a_non_local_url(pair, tmp_path):
    import fsspec
    mem = fsspec.filesystem("memory")
    try:
        assert run(pair, "memory://samples/grid.png", "--classes", "1,2", "-n", "2", "--per-image", "--seed", "3") == 0
        assert run(pair, tmp_path / "grid.png", "--classes", "1,2", "-n", "2", "--per-image", "--seed", "3") == 0
        assert mem.cat("memory://samples/grid.png") == (tmp_path / "grid.png").read_bytes()
        names = sorted(p.rsplit("/", 1)[-1] for p in mem.ls("memory://samples/grid", detail=False))
        assert names == [f"{i:06d}.png" for i in range(4)]
        for n in names:
            assert mem.cat(f"memory://samples/grid/{n}") == (tmp_path / "grid" / n).read_bytes()
        assert not [p for p in mem.find("memory://samples") if ".tmp" in p or "/." in p]   # no temporaries left
    finally:
        mem.rm("memory://samples", recursive=True)
