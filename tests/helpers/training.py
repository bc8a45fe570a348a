"""Training the way users do (a subprocess of ``python -m mqscale.train``), one rank in a process
of its own, and the demo-sized data both need."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from data_tools.make_shapes import write_shapes
from mqscale.core.session import StorageSession
from mqscale.data.synthetic import token_set
from mqscale.data.tokens import TokenMeta
from mqscale.tokenize.jobs import Options
from mqscale.tokenize.pool import run as tokenize_run
from mqscale.train.config import load_train_config
from mqscale.train.trainer import Trainer
from tests.helpers.exports import export_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO_META = TokenMeta(grid=8, codebook_size=256, seq_len=32, cond="class", n_classes=10, tokenizer_sha256="0" * 64)


def build_demo_data(d: Path) -> Path:
    """240 shapes images (4 shards), a demo tokenizer and its token shards under ``d``: 15 steps
    of 2 ranks x 8 rows are exactly one epoch."""
    write_shapes(str(d / "shapes"), 240, resolution=32, shard_size=60, progress=False)
    export_tokenizer(d / "tokenizer")
    tokenize_run(Options(tokenizer=str(d / "tokenizer"), input=str(d / "shapes"), output=str(d / "tokens")),
                 workers=0, progress=False)
    return d


def train(demo: Path, storage, *overrides, env=None, launcher=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m mqscale.train`` on the demo config and ``demo``'s data, runs under ``storage``."""
    args = [sys.executable, "-m", "mqscale.train", "--config", "configs/demo.yaml",
            f"data.train_url={demo / 'tokens'}", f"logging.tokenizer={demo / 'tokenizer'}",
            f"checkpoint.dir={storage}", "logging.log_every=2", "data.batch_size=8", *overrides]
    if launcher:
        args = launcher + ["mqscale.train"] + args[3:] + ["--launcher", "deepspeed"]
    # RAY_DEDUP_LOGS=0: Ray would fold the ranks' alike log lines into one, and the tests count lines
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})})


def losses(out: str) -> list[float]:
    return [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if " loss " in line and "step " in line]


def events(tb_dir) -> EventAccumulator:
    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return ea


def hparams(ea: EventAccumulator) -> dict:
    """The hparams a run logged (tensorboard's hparams plugin record)."""
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def client_state(ckpt: Path) -> dict:
    """What a checkpoint says about the run: step, tokens, every rank's loader position and RNG."""
    # our own test run's DeepSpeed pickle (ZeRO-3 writes one per rank, with the client state in each)
    f = ckpt / "ds" / "mp_rank_00_model_states.pt"
    if not f.exists():
        f = ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=False)


@contextlib.contextmanager
def one_rank_group():
    """A real one-process gloo group, as Ray Train or the deepspeed launcher would have made it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def in_one_rank(module: str, case: str, *args) -> str:
    """Run ``case(*args)`` (a function of the test module ``module``) in a fresh process holding a
    one-rank gloo group: DeepSpeed caches its process groups per process, so each case gets a
    process of its own. Returns its stdout."""
    code = (f"from tests.helpers.training import one_rank_group\nfrom {module} import {case}\n"
            f"with one_rank_group():\n    {case}(*{args!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def one_rank_run(tmp: Path, name: str, *overrides: str):
    """A Trainer for the demo config in this process: world 1, bf16, synthetic tokens."""
    tokens = tmp / "tokens"
    if not tokens.exists():
        token_set(str(tokens), [64, 64], meta=DEMO_META)
    cfg = load_train_config("configs/demo.yaml", [f"data.train_url={tokens}", f"checkpoint.dir={tmp}", f"name={name}",
                                                  "logging.tokenizer=", "ray.num_workers=1", "data.batch_size=8",
                                                  "logging.log_every=1", *overrides])
    return Trainer(cfg, StorageSession(f"{tmp}/{name}", None, cfg.checkpoint.keep_last))
