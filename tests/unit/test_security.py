"""The security pass: each finding has a test. Untrusted bytes never unpickle, names never climb out
of their directory, no shell ever sees a user string, and credentials never reach a log or a file."""
from __future__ import annotations

import ast
import json
import tarfile
from pathlib import Path

import pytest

from data_tools.make_shapes import write_shapes
from mqscale.core.errors import ArtifactError, ManifestError
from mqscale.core.secrets import redacted
from mqscale.data.loader import StreamingLoader
from mqscale.data.manifest import read_manifest
from mqscale.data.synthetic import token_set
from mqscale.data.tar import TarWriter
from tests.helpers.exports import export_pair
from tests.helpers.shards import add_member, loader_cfg, members_of, valid_ids

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("mqscale", "data_tools", "bench") for p in (ROOT / d).rglob("*.py"))


# ------------------------------------------------------------------ path traversal


def test_a_member_named_to_climb_out_is_refused_and_counted(tmp_path):
    token_set(str(tmp_path), [16, 16])
    shard = tmp_path / "tokens-000000.tar"
    members = members_of(shard)
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            add_member(tf, name, data)
        for evil in ("../../escaped.txt", "/tmp/absolute.txt", "a/../../b.npy"):
            add_member(tf, evil, b"x")
    loader = StreamingLoader(str(tmp_path), loader_cfg())
    assert sorted(valid_ids(loader)) == list(range(32))
    assert loader.stats()["refused_members"] == 3
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/abs.png", "s3://bucket/x.png", "a\\b.png"])
def test_shards_never_hold_unsafe_member_names(tmp_path, name):
    with open(tmp_path / "t.tar", "wb") as f, pytest.raises(ValueError, match="never hold such names"):
        TarWriter(f).add(name, b"x")


def manifest_with_shard(d: Path, shard_name: str) -> None:
    write_shapes(str(d), 4, resolution=16, shard_size=4, progress=False)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["name"] = shard_name
    (d / "manifest.json").write_text(json.dumps(m))


def test_a_manifest_naming_a_shard_outside_its_directory_is_refused(tmp_path):
    manifest_with_shard(tmp_path / "set", "../../etc/passwd")
    with pytest.raises(ManifestError, match="unsafe"):
        read_manifest(str(tmp_path / "set"))
    from data_tools.verify import main as verify_main
    assert verify_main([str(tmp_path / "set")]) == 2


def test_a_rerun_over_a_hostile_manifest_deletes_nothing_outside(tmp_path):
    """The writer removes the previous manifest's shards when settings change: a manifest naming
    ../victim.txt must not make it delete that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    manifest_with_shard(out, "../victim.txt")
    write_shapes(str(out), 4, resolution=32, shard_size=4, progress=False)  # other settings: a rewrite
    assert victim.read_text() == "keep me"
    assert read_manifest(str(out)).shards[0].name.startswith("shapes-")


def test_an_export_naming_weights_outside_its_directory_is_refused(tmp_path):
    from mqscale.train.config import STACKFORMER
    model, _ = export_pair(tmp_path)
    meta = json.loads(Path(model, "config.json").read_text())
    meta["weights"] = "../tok/model.safetensors"
    Path(model, "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        STACKFORMER.load(model)


# ------------------------------------------------------------------ credentials


def test_storage_credentials_are_redacted_wherever_configs_are_shown():
    cfg = {"data": {"storage_options": {"endpoint_url": "http://s3.local", "key": "AKIA-SECRET",
                                        "secret": "s3cr3t", "client_kwargs": {"aws_session_token": "tok"}}},
           "checkpoint": {"storage_options": {"token": "t0k", "anon": False}}, "name": "key-run"}
    shown = json.dumps(redacted(cfg))
    for secret in ("AKIA-SECRET", "s3cr3t", '"tok"', "t0k"):
        assert secret not in shown
    assert "http://s3.local" in shown and "key-run" in shown   # only credentials go


def test_evaluation_results_never_hold_the_storage_secret(tmp_path, capsys):
    from mqscale.evaluate.__main__ import main as evaluate_main
    shapes = tmp_path / "shapes"
    write_shapes(str(shapes), 8, resolution=32, shard_size=8, progress=False)
    _, tok = export_pair(tmp_path)
    secret = "SECRET-VALUE-1234"
    rc = evaluate_main(["--tokenizer", tok, "--data", str(shapes), "--config", "configs/eval/debug.yaml",
                        "eval.num_images=4", f"eval.storage_options={{secret: {secret}}}",
                        f"logging.tensorboard_dir={tmp_path}/tb", "--out", str(tmp_path / "out")])
    assert rc == 0
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "shapes" not in p.parts)
    out = capsys.readouterr()
    assert secret.encode() not in written and secret not in out.out + out.err
    assert b"<redacted>" in (tmp_path / "out" / "results.json").read_bytes()


# ------------------------------------------------------------------ unpickling and shells, statically


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


# torch.load calls that open pickles by design, each behind a documented trust boundary
TRUSTED_TORCH_LOADS = {"mqscale/convert/__main__.py": "--trust-pickle, given by the user for a file they trust"}


@pytest.mark.slow
def test_no_source_unpickles_untrusted_bytes_or_runs_a_shell():
    found = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for node, owner, name in calls(ast.parse(path.read_text(), rel)):
            where = f"{rel}:{node.lineno}"
            if owner in ("pickle", "cPickle", "dill", "joblib", "marshal") and name in ("load", "loads"):
                found.append(f"{where}: {owner}.{name}")
            if name in ("load", "save") and owner == "np" and isinstance(kw(node, "allow_pickle"), ast.Constant) \
                    and kw(node, "allow_pickle").value is True:
                found.append(f"{where}: np.{name}(allow_pickle=True)")
            if isinstance(kw(node, "shell"), ast.Constant) and kw(node, "shell").value is True:
                found.append(f"{where}: shell=True")
            if owner == "os" and name in ("system", "popen"):
                found.append(f"{where}: os.{name}")
            if owner == "yaml" and name == "load":
                found.append(f"{where}: yaml.load (use safe_load)")
            if owner == "torch" and name == "load":
                wo = kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True) and rel not in TRUSTED_TORCH_LOADS \
                        and "Trust boundary" not in path.read_text().splitlines()[node.lineno - 2]:
                    found.append(f"{where}: torch.load without weights_only=True and no stated trust boundary")
    assert found == []


def test_no_pipe_urls_in_sources():
    hits = [f"{p.relative_to(ROOT)}" for p in SOURCES if '"pipe:' in p.read_text() and "refuse" not in p.read_text()]
    assert hits == []
