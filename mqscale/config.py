"""Typed run configuration: dataclasses <-> YAML, strict validation, dotted overrides.

Why this shape: a config file should read as a short diff from the defaults below (a file may
name a ``base:`` file it amends), map 1:1 onto dataclasses, and fail on any user error with one
line that names the key and where it came from (a file, or the command line), never a traceback.
The resolved config is a plain dict (``to_dict``) that travels inside every checkpoint, so a
checkpoint alone rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = "command line"


class ConfigError(ValueError):
    """A user error in a config; ``str(e)`` is the single line to show."""


def _f(default: Any, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, doc: str = "") -> Any:
    """A dataclass field with a numeric range and a one-line description."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """Stackformer. Defaults are the debug size; named configs scale it."""
    arch: Literal["stackformer"] = "stackformer"
    order: Literal["code_first", "pos_first"] = _f(
        "code_first", doc="code_first is the paper's Stackformer; pos_first is Stackformer_r")
    n_code_layer: int = _f(2, ge=1, doc="blocks in the Code-Transformer")
    n_pos_layer: int = _f(2, ge=1, doc="blocks in the Position-Transformer")
    n_embd: int = _f(128, ge=8, doc="width")
    n_head: int = _f(4, ge=1, doc="attention heads (must divide n_embd)")
    dropout: float = _f(0.0, ge=0.0, lt=1.0, doc="embedding, attention and residual dropout")
    codebook_size: int = _f(1024, ge=2, doc="K: number of codes")
    grid: int = _f(32, ge=1, doc="side of the token grid; G = grid*grid positions")
    seq_len: int = _f(64, ge=1, doc="L: kept codes per image (mask ratio * G)")
    block_size: int = _f(0, ge=0, doc="max Code-Transformer length; 0 = prefix + L - 1")
    cond: Literal["none", "class", "text"] = _f("class", doc="conditioning kind")
    n_classes: int = _f(1000, ge=1, doc="classes, when cond=class")
    text_vocab_size: int = _f(258, ge=2, doc="text token ids, when cond=text")
    text_len: int = _f(32, ge=1, doc="T: text prefix length, when cond=text")
    abs_pos: bool = _f(True, doc="learned absolute sequence-index embedding")
    pos_loss_weight: float = _f(1.0, ge=0.0, doc="lambda in loss = code CE + lambda * position CE")
    activation_checkpointing: bool = _f(False, doc="recompute every block in backward")
    checkpoint_blocks: list[int] = _f([], doc="recompute only these blocks (code blocks 0.., then "
                                      "position blocks); overrides activation_checkpointing")
    init_std: float = _f(0.02, gt=0.0, doc="std of the normal init of weights")

    @property
    def n_positions(self) -> int:
        return self.grid * self.grid

    @property
    def prefix_len(self) -> int:
        return self.text_len if self.cond == "text" else 1

    @property
    def resolved_block_size(self) -> int:
        return self.block_size or (self.prefix_len + self.seq_len - 1)

    def check(self, err) -> None:
        if self.n_embd % self.n_head:
            err("model.n_head", f"{self.n_head} does not divide model.n_embd={self.n_embd}")
        if self.seq_len > self.n_positions:
            err("model.seq_len", f"{self.seq_len} is over the grid's {self.grid}x{self.grid}="
                f"{self.n_positions} positions")
        n_blocks = self.n_code_layer + self.n_pos_layer
        for i, b in enumerate(self.checkpoint_blocks):
            if not 0 <= b < n_blocks:
                err(f"model.checkpoint_blocks[{i}]", f"{b} is not a block index (0..{n_blocks - 1})")
        need = self.prefix_len + self.seq_len - 1
        if self.block_size and need > self.block_size:
            err("model.seq_len", f"prefix {self.prefix_len} + seq_len {self.seq_len} - 1 = {need} "
                f"is over model.block_size={self.block_size}")


@dataclass
class DataConfig:
    """Shards to stream (token shards for Stackformer, image shards for the tokenizer)."""
    train_url: str = _f("", doc="manifest (or its directory) or a brace pattern, any fsspec URL")
    val_url: str = _f("", doc="validation manifest or pattern")
    kind: Literal["auto", "tokens", "images"] = _f("auto", doc="auto reads it from the manifest")
    batch_size: int = _f(8, ge=1, doc="micro-batch per rank")
    num_workers: int = _f(1, ge=0, doc="DataLoader worker processes per rank")
    mode: Literal["epoch", "resampled"] = _f("epoch", doc="epoch: each sample once per epoch; "
                                            "resampled: endless shards drawn with replacement")
    shuffle: bool = _f(True, doc="seeded shuffle of shard order and within windows")
    shuffle_buffer: int = _f(4096, ge=1, doc="rows per shuffle window")
    seed: int = _f(0, ge=0, doc="data order seed (with the epoch)")
    resolution: int = _f(256, ge=8, doc="images: resize + center-crop to this square size")
    on_shard_error: Literal["fail", "skip"] = _f("fail", doc="a shard unreadable after retries")
    prefetch_factor: int = _f(4, ge=1, doc="batches each worker prepares ahead")
    worker_start: Literal["spawn", "forkserver", "fork"] = _f(
        "spawn", doc="how workers start; fork is unsafe with async filesystems (s3fs)")
    storage_options: dict[str, Any] = _f({}, doc="fsspec options, e.g. {endpoint_url: ..., anon: true}")


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine decay (the paper: betas 0.9/0.95, wd 0.01, floor 0.0005*lr)."""
    lr: float = _f(5e-4, gt=0.0, doc="peak learning rate")
    min_lr_ratio: float = _f(0.0005, ge=0.0, le=1.0, doc="cosine floor as a fraction of lr")
    weight_decay: float = _f(0.01, ge=0.0, doc="decoupled weight decay (not on biases/norms/embeddings)")
    betas: tuple[float, float] = _f((0.9, 0.95), doc="AdamW betas")
    eps: float = _f(1e-8, gt=0.0)
    warmup_steps: int = _f(0, ge=0, doc="linear warmup steps")
    grad_clip: float = _f(1.0, ge=0.0, doc="global grad-norm clip; 0 disables")

    def check(self, err) -> None:
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                err("optim.betas", f"{list(self.betas)} must each be in [0, 1)")


@dataclass
class TrainConfig:
    max_steps: int = _f(100, ge=1, doc="optimizer steps")
    grad_accum: int = _f(1, ge=1, doc="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = _f("bf16", doc="fp16 is GPU-only")
    seed: int = _f(0, ge=0)
    global_batch: int = _f(0, ge=0, doc="sequences per optimizer step; 0 = batch_size x world x grad_accum")
    max_nonfinite: int = _f(3, ge=1, doc="non-finite steps in a row that stop the run")
    eval_every: int = _f(0, ge=0, doc="steps between validations; 0 = never")
    p_uncond: float = _f(0.0, ge=0.0, lt=1.0, doc="condition dropout for classifier-free guidance")


@dataclass
class CheckpointConfig:
    dir: str = _f("runs", doc="run storage root (local dir or s3://...): runs live in <dir>/<name>")
    every_steps: int = _f(0, ge=0, doc="steps between checkpoints; 0 = only at the end")
    keep_last: int = _f(3, ge=2, doc="checkpoints kept (at least 2, so a damaged newest has a fallback)")
    resume: Literal["auto", "never"] = _f("auto", doc="auto resumes from the newest verified checkpoint")
    resume_from: str = _f("", doc="resume from this checkpoint URL instead")
    storage_options: dict[str, Any] = _f({}, doc="fsspec options for the storage root (endpoint, keys)")


@dataclass
class LoggingConfig:
    tensorboard_dir: str = _f("", doc="TensorBoard event dir; empty = <run dir>/tb (synced to storage)")
    log_every: int = _f(10, ge=1, doc="steps between scalar logs")
    sample_every: int = _f(0, ge=0, doc="steps between sampled image grids; 0 = only at the end")
    tokenizer: str = _f("", doc="exported tokenizer that decodes sample grids; empty = no grids")
    peak_tflops: float = _f(0.0, ge=0.0, doc="device peak for MFU; 0 = look the device up")


@dataclass
class RayConfig:
    address: Optional[str] = _f(None, doc="Ray cluster address; None starts a local Ray")
    num_workers: int = _f(1, ge=1, doc="training workers")
    use_gpu: bool = _f(False)
    cpus_per_worker: float = _f(1.0, gt=0.0)
    resources_per_worker: dict[str, float] = _f({})
    max_failures: int = _f(0, ge=-1, doc="worker-group restarts; -1 = unlimited")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(1, ge=0, le=3)
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str = _f("", doc="required with nvme offload")
    config_json: str = _f("", doc="an expert's own DeepSpeed JSON; our fields are checked against it")

    def check(self, err) -> None:
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            err("deepspeed.offload_optimizer", f"{self.offload_optimizer} needs deepspeed.zero_stage 1, 2 or 3 "
                "(ZeRO-Offload partitions the optimizer state)")
        if self.offload_param != "none" and self.zero_stage != 3:
            err("deepspeed.offload_param", f"{self.offload_param} needs deepspeed.zero_stage=3, "
                f"not {self.zero_stage}")
        if "nvme" in (self.offload_param, self.offload_optimizer) and not self.nvme_path:
            err("deepspeed.nvme_path", "is required when offloading to nvme")


@dataclass
class Config:
    name: str = _f("debug", doc="run name")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def check(self, err) -> None:
        if self.train.p_uncond > 0 and self.model.cond == "none":
            err("train.p_uncond", f"{self.train.p_uncond} needs a conditional model (model.cond is none); "
                "set train.p_uncond=0")


# --------------------------------------------------------------------------- typed conversion


def _coerce(value: Any, tp: Any, key: str, err) -> Any:
    """Convert a YAML value to the annotated type, or report the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            err(key, f"must be a mapping of {tp.__name__} fields, got {_show(value)}")
        return _build(tp, value, key, err)
    if origin is Literal:
        if value not in args:
            err(key, f"{_show(value)} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, err)
    if tp is bool:
        if not isinstance(value, bool):
            err(key, f"must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            err(key, f"must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            err(key, f"must be a number, got {_show(value)}")
        if not math.isfinite(value):
            err(key, f"must be finite, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            err(key, f"must be a string, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            err(key, f"must be a list of {len(args)} values, got {_show(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", err) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            err(key, f"must be a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", err) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            err(key, f"must be a mapping, got {_show(value)}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", err) for k, v in value.items()}
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug here, not a user error


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _build(cls: type, data: dict, prefix: str, err) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), names, n=1)
            err(key, "unknown key" + (f" (did you mean {close[0]}?)" if close else ""))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        v = _coerce(data[f.name], hints[f.name], key, err)
        _check_range(v, f.metadata, key, err)
        kwargs[f.name] = v
    return cls(**kwargs)


def _check_range(v: Any, meta: Any, key: str, err) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return
    for op, bound, ok in (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
                          ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)):
        b = meta.get(op)
        if b is not None and not ok(v, b):
            err(key, f"{v} is out of range (must be {bound} {b})")


# --------------------------------------------------------------------------- loading


class _Reporter:
    """Turns (key, message) into a ConfigError naming the key and where it was set."""

    def __init__(self, origins: dict[str, str], default: str):
        self.origins, self.default = origins, default

    def __call__(self, key: str, msg: str):
        src = self.origins.get(key)
        if src is None:  # a key inside a mapping that was set as a whole, or a nested list item
            parts = key.replace("[", ".").split(".")
            for i in range(len(parts) - 1, 0, -1):
                src = self.origins.get(".".join(parts[:i]))
                if src:
                    break
        raise ConfigError(f"{src or self.default}: {key}: {msg}")


def _record(d: dict, src: str, origins: dict, prefix: str = "") -> None:
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        origins[key] = src
        if isinstance(v, dict):
            _record(v, src, origins, key)


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in _OPAQUE:
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


# mappings whose contents are user data, replaced whole rather than merged key by key
_OPAQUE = {"storage_options", "resources_per_worker"}


def _read_yaml(path: Path, origins: dict, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: base: cycle through {' -> '.join(map(str, seen + (path,)))}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a YAML file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    merged: dict = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: must be a path string, got {_show(base)}")
        merged = _read_yaml((path.parent / base).resolve(), origins, seen + (path,))
    _record(data, str(path), origins)
    return _merge(merged, data)


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or else relative to the repository (so configs/... works anywhere)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"{CLI}: {text!r}: overrides look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str], origins: dict) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{CLI}: {'.'.join(parts)}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
        _record({".".join(parts): value}, CLI, origins)
    return data


def from_dict(data: dict, source: str = "<dict>", origins: dict[str, str] | None = None,
              root: type = None) -> Any:
    """Build and validate a config (``root``: Config, or another run's top-level dataclass);
    every user error raises ConfigError naming the key and its source."""
    err = _Reporter(origins or {}, source)
    cfg = _build(root or Config, data, "", err)
    for section in [cfg] + [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]:
        if hasattr(section, "check"):
            section.check(err)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                root: type = None) -> Any:
    origins: dict[str, str] = {}
    data: dict = {}
    source = CLI
    if path is not None:
        p = resolve_path(path)
        source = str(p)
        data = _read_yaml(p.resolve() if p.exists() else p, origins)
        origins = {k: (source if v == str(p.resolve()) else v) for k, v in origins.items()}
    apply_overrides(data, list(overrides or []), origins)
    return from_dict(data, source, origins, root)


def to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-safe dict of a config (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session", "auth", "signature")


def redacted(value: Any, drop: bool = False) -> Any:
    """A copy of a plain config dict safe to print or log: under any ``storage_options`` (and in
    any nested mapping there) every entry whose name suggests a credential is replaced, so keys
    and tokens never reach a console, a log file or TensorBoard. ``drop``: removed instead (see
    ``without_credentials``)."""
    def walk(v: Any, secret_scope: bool) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                inside = secret_scope or k == "storage_options"
                if secret_scope and any(w in str(k).lower() for w in SECRET_WORDS) and not isinstance(x, dict):
                    if not drop:
                        out[k] = "<redacted>"
                else:
                    out[k] = walk(x, inside)
            return out
        if isinstance(v, (list, tuple)):
            return [walk(x, secret_scope) for x in v]
        return v
    return walk(to_dict(value) if dataclasses.is_dataclass(value) else value, False)


def without_credentials(value: Any) -> dict:
    """The config as it is stored with an artifact (checkpoints, exports, manifests): credentials
    under ``storage_options`` are left out, so whoever later reads the artifact (sampling,
    evaluation, a resumed run elsewhere) brings their own, from the environment or the command
    line; endpoints and other options stay."""
    return redacted(value, drop=True)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
