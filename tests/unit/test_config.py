"""Config system: typed YAML, strict one-line errors, dotted overrides, named configs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mqscale.core.config import from_dict, to_dict
from mqscale.core.errors import ConfigError
from mqscale.models.stackformer.counting import param_count
from mqscale.train.config import Config, load_train_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BAD = [  # (yaml, overrides, expected fragments of the one-line message)
    ("model:\n  n_embdd: 64\n", [], ["model.n_embdd", "unknown key", "did you mean n_embd"]),
    ("modle:\n  n_embd: 64\n", [], ["modle", "unknown key", "did you mean model"]),
    ("model:\n  n_head: four\n", [], ["model.n_head", "must be an integer", "four"]),
    ("model:\n  abs_pos: 1\n", [], ["model.abs_pos", "true or false"]),
    ("optim:\n  lr: -0.1\n", [], ["optim.lr", "out of range", "> 0.0"]),
    ("model:\n  dropout: 1.5\n", [], ["model.dropout", "out of range"]),
    ("model:\n  n_embd: 100\n  n_head: 16\n", [], ["model.n_head", "does not divide", "n_embd=100"]),
    ("model:\n  seq_len: 80\n  block_size: 64\n", [], ["model.seq_len", "over model.block_size=64"]),
    ("model:\n  grid: 4\n  seq_len: 20\n", [], ["model.seq_len", "4x4=16"]),
    ("model:\n  cond: image\n", [], ["model.cond", "not one of", "class"]),
    ("deepspeed:\n  zero_stage: 2\n  offload_param: cpu\n", [], ["deepspeed.offload_param", "zero_stage=3"]),
    ("optim:\n  betas: [0.9]\n", [], ["optim.betas", "list of 2"]),
    ("model: [1, 2]\n", [], ["model", "must be a mapping"]),
    ("model:\n  n_embd: 64\n", ["model.n_head=3"], ["command line", "model.n_head", "does not divide"]),
    ("", ["optim.lrr=1e-3"], ["command line", "optim.lrr", "unknown key"]),
    ("model:\n  checkpoint_blocks: [0, 9]\n", [], ["model.checkpoint_blocks[1]", "not a block index", "0..3"]),
    ("model:\n  cond: none\ntrain:\n  p_uncond: 0.1\n", [], ["train.p_uncond", "set train.p_uncond=0"]),
]


@pytest.mark.parametrize("text,overrides,fragments", BAD)
def test_bad_config_gives_one_line_naming_key_and_source(tmp_path, text, overrides, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_train_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg
    if "command line" not in fragments:
        assert str(path) in msg, msg


def test_error_names_the_file_that_set_the_key(tmp_path):
    write(tmp_path, "model:\n  n_head: 7\n", "base.yaml")
    child = write(tmp_path, "base: base.yaml\nname: child\n", "child.yaml")
    with pytest.raises(ConfigError) as e:
        load_train_config(child)
    assert "base.yaml: model.n_head" in str(e.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d"):
        load_train_config(write(tmp_path, "model:\n  n_embd: [1,\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_a_binary_file_is_one_line_not_a_traceback(tmp_path):
    p = tmp_path / "weights.yaml"
    p.write_bytes(b"model:\n  n_embd: \xff\xfe\x00\x81\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(p)
    assert str(p) in str(e.value) and "not UTF-8" in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_blocks_pick_the_recomputed_blocks():
    from mqscale.models.stackformer.model import Stackformer
    cfg = from_dict({"model": {"checkpoint_blocks": [1, 2]}}, "dict", Config)
    model = Stackformer(cfg.model)
    blocks = list(model.code_transformer.blocks) + list(model.pos_transformer.blocks)
    assert [b.checkpoint for b in blocks] == [False, True, True, False]
    every = Stackformer(from_dict({"model": {"activation_checkpointing": True}}, "dict", Config).model)
    assert all(b.checkpoint for b in list(every.code_transformer.blocks) + list(every.pos_transformer.blocks))


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_train_config(tmp_path / "a.yaml")


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_train_config(write(tmp_path, "model:\n  n_embd: 64\n"),
                      ["model.n_embd=512", "model.n_head=8", "optim.lr=3e-4", "model.abs_pos=false",
                       "optim.betas=[0.8,0.9]", "data.storage_options={endpoint_url: http://x}"])
    assert cfg.model.n_embd == 512 and cfg.model.n_head == 8
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.abs_pos is False
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.storage_options == {"endpoint_url": "http://x"}


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_train_config(write(tmp_path, "optim:\n  lr: 3e-4\n"))
    assert cfg.optim.lr == pytest.approx(3e-4)


def test_round_trip_through_dict_is_identity():
    cfg = load_train_config("configs/stackformer/607m.yaml", ["train.max_steps=7"])
    again = from_dict(to_dict(cfg), "roundtrip", Config)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("name", ["debug", "307m", "607m", "1.4b", "3b", "7b"])
def test_named_configs_load(name):
    cfg = load_train_config(f"configs/stackformer/{name}.yaml")
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert param_count(cfg.model) > 0


def test_paper_configs_follow_table_2():
    small = load_train_config("configs/stackformer/307m.yaml").model
    large = load_train_config("configs/stackformer/607m.yaml").model
    assert (small.n_code_layer, small.n_pos_layer, small.n_embd, small.n_head, small.dropout) == (18, 6, 1024, 16, 0.1)
    assert (large.n_code_layer, large.n_pos_layer, large.n_embd, large.n_head, large.dropout) == (36, 12, 1024, 16, 0.1)
    for m in (small, large):
        assert (m.cond, m.n_classes, m.codebook_size, m.grid, m.seq_len) == ("class", 1000, 1024, 32, 256)


@pytest.mark.integration
def test_cli_prints_one_line_and_exits_2_without_traceback(tmp_path):
    code = ("import sys; from mqscale.core.cli import guarded, add_config_args, config_from_args\n"
            "import argparse; from mqscale.train.config import Config\n"
            "@guarded\n"
            "def main():\n"
            "    p = argparse.ArgumentParser(); add_config_args(p); config_from_args(p.parse_args(), Config)\n"
            "sys.exit(main())\n")
    path = write(tmp_path, "model:\n  n_head: 5\n")
    r = subprocess.run([sys.executable, "-c", code, "--config", str(path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("config error: ") and "model.n_head" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in r.stderr


def test_generated_reference_tables_are_current():
    from mqscale.docs import DOCS, block, tables
    for fname, blocks in tables().items():
        text = (DOCS / fname).read_text()
        for name, table in blocks.items():
            assert block(text, name) == table, f"docs/{fname}: {name}: run python -m mqscale.docs"


# old key -> new key, for both trainers: what a config file written before the rename sets
RENAMED = [("tokenizer", "train.checkpoint_every", "checkpoint.every_steps", 7),
           ("tokenizer", "train.log_every", "logging.log_every", 3),
           ("tokenizer", "train.image_every", "logging.image_every", 9),
           ("stackformer", "logging.sample_every", "logging.image_every", 11)]


def _load(kind: str, path=None, overrides=()):
    from mqscale.tokenizer.config import load_tokenizer_config
    return (load_tokenizer_config if kind == "tokenizer" else load_train_config)(path, list(overrides))


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("kind,old,new,value", RENAMED)
def test_a_renamed_key_still_loads_with_one_deprecation_line(tmp_path, caplog, kind, old, new, value):
    section, name = old.split(".")
    path = write(tmp_path, f"{section}:\n  {name}: {value}\n")
    with caplog.at_level("WARNING", logger="mqscale.config"):
        from_file = _load(kind, path)
    lines = [r.getMessage() for r in caplog.records if r.name == "mqscale.config"]
    assert _get(from_file, new) == value
    assert lines == [f"{path}: {old} is deprecated, read as {new} (rename it)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mqscale.config"):
        from_cli = _load(kind, None, [f"{old}={value}"])
    assert _get(from_cli, new) == value
    assert [r.getMessage() for r in caplog.records] == [f"command line: {old} is deprecated, read as {new} (rename it)"]


def test_an_old_key_and_its_new_name_together_are_one_error(tmp_path):
    path = write(tmp_path, "logging:\n  sample_every: 5\n  image_every: 6\n")
    with pytest.raises(ConfigError, match="logging.sample_every: the old name of logging.image_every, which is set too"):
        load_train_config(path)


@pytest.mark.parametrize("kind,old,new,value", RENAMED)
def test_stored_configs_with_old_keys_load_silently(caplog, kind, old, new, value):
    """A checkpoint's run_config.json or an export's config.json written before the rename."""
    from mqscale.tokenizer.config import TokenizerRunConfig
    root = TokenizerRunConfig if kind == "tokenizer" else Config
    stored = to_dict(root())
    new_section, new_name = new.split(".")
    del stored[new_section][new_name]
    old_section, old_name = old.split(".")
    stored[old_section][old_name] = value
    with caplog.at_level("WARNING", logger="mqscale.config"):
        cfg = from_dict(stored, "old/config.json", root)
    assert _get(cfg, new) == value and not caplog.records


def test_the_repository_configs_use_no_old_key(caplog):
    from mqscale.tokenizer.config import load_tokenizer_config
    with caplog.at_level("WARNING", logger="mqscale.config"):
        for f in sorted((ROOT / "configs" / "mqvae").glob("*.yaml")):
            load_tokenizer_config(f)
        for f in sorted((ROOT / "configs" / "stackformer").glob("*.yaml")) + [ROOT / "configs" / "demo.yaml"]:
            load_train_config(f)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_section_keeps_its_root_defaults_when_a_file_sets_part_of_it(tmp_path):
    """A tokenizer run logs image grids every 200 steps and reads image shards by default; a file
    that sets another logging or data key keeps those defaults (not the shared class's)."""
    from mqscale.tokenizer.config import load_tokenizer_config
    cfg = load_tokenizer_config(write(tmp_path, "logging:\n  log_every: 4\ndata:\n  batch_size: 2\n"))
    assert (cfg.logging.log_every, cfg.logging.image_every) == (4, 200)
    assert (cfg.data.batch_size, cfg.data.kind) == (2, "images")


@pytest.mark.parametrize("overrides,fragments", [
    (["model.ch=48"], ["model.ch", "multiples of 32"]),
    (["model.mask_ratio=0.001"], ["model.mask_ratio", "keeps no cell"]),
    (["data.resolution=32"], ["data.resolution", "model.resolution=64"]),
    (["data.kind=tokens"], ["data.kind", "trains on images"]),
    (["model.resolution=62", "data.resolution=62"], ["model.resolution", "not divisible by f = 4"]),
    (["loss.recon=l3"], ["loss.recon", "not one of"]),
])
def test_tokenizer_config_errors(overrides, fragments):
    from mqscale.tokenizer.config import load_tokenizer_config
    with pytest.raises(ConfigError) as e:
        load_tokenizer_config("configs/mqvae/debug.yaml", overrides)
    for f in fragments:
        assert f in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["debug", "demo", "f8_r25", "f8_r30", "f16_r50"])
def test_tokenizer_configs_load(name):
    from mqscale.tokenizer.config import load_tokenizer_config
    c = load_tokenizer_config(f"configs/mqvae/{name}.yaml")
    assert c.model.keep >= 1
