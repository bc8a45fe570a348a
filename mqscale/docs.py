"""python -m mqscale.docs: regenerate the reference tables in docs/ from the code.

Each table sits between ``<!-- name:start -->`` and ``<!-- name:end -->`` in one file of docs/:
the config keys of every run config (from the dataclasses: type, default, range, meaning), the
renamed keys (from each root's ``RENAMED``), and the model sizes and scaling plan of the named
Stackformer configs (``mqscale.plan`` at its defaults). A test keeps them current.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from mqscale.core.config import REPO_ROOT, to_dict
from mqscale.evaluate.config import EvalRunConfig
from mqscale.models.stackformer.counting import param_count, train_flops_per_token
from mqscale.tokenizer.config import TokenizerRunConfig
from mqscale.train.config import Config, load_train_config
from mqscale.train.plan import plan

DOCS = REPO_ROOT / "docs"
SIZES = ("debug", "307m", "607m", "1.4b", "3b", "7b")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def reference_markdown(root: type) -> str:
    """Every key of a run config class: type, default (as the root declares it), range, meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    defaults = root()
    for sec in dataclasses.fields(root):
        cls = typing.get_type_hints(root)[sec.name]
        if not dataclasses.is_dataclass(cls):
            lines.append(f"| `{sec.name}` | {cls.__name__} | `{sec.default}` | {sec.metadata.get('doc', '')} |")
            continue
        hints, section = typing.get_type_hints(cls), getattr(defaults, sec.name)
        for f in dataclasses.fields(cls):
            rng = ", ".join(f"{op} {f.metadata[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                            if f.metadata.get(k) is not None)
            doc = f.metadata.get("doc", "") + (f" ({rng})" if rng else "")
            lines.append(f"| `{sec.name}.{f.name}` | {_type_name(hints[f.name])} | "
                         f"`{to_dict(getattr(section, f.name))}` | {doc} |")
    return "\n".join(lines)


def renamed_markdown() -> str:
    """The old key names that still load (with one deprecation line each) and what they mean now."""
    lines = ["| run config | old key | now |", "|---|---|---|"]
    for what, root in (("Stackformer", Config), ("tokenizer", TokenizerRunConfig)):
        lines += [f"| {what} | `{old}` | `{new}` |" for old, new in root.RENAMED.items()]
    return "\n".join(lines)


def scaling_table() -> str:
    """What fits where and how fast (``mqscale.plan`` at its defaults: 80 GB GPUs, 40% MFU of an
    H100's dense bf16 peak, one ImageNet epoch), for the six named Stackformer configs."""
    lines = ["| config | params | GFLOP/token | fits on 1 GPU | fits on 8 GPUs | tokens/s, 8 GPUs | "
             "hours/epoch, 8 GPUs | hours/epoch, 64 GPUs |", "|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        cfg = load_train_config(f"configs/stackformer/{size}.yaml")
        one, eight, many = plan(cfg, 1, 80.0), plan(cfg, 8, 80.0), plan(cfg, 8, 80.0, nodes=8)
        params = one["params"] / 1e6
        lines.append(f"| {size} | {params:,.{1 if params < 10 else 0}f}M | {one['train_flops_per_token'] / 1e9:.2f} | "
                     f"{one['smallest_fit'] or 'no'} | {eight['smallest_fit'] or 'no'} | "
                     f"{eight['tokens_per_s']:,.0f} | {_fixed(24 * eight['days_per_epoch'], 2)} | "
                     f"{_fixed(24 * many['days_per_epoch'], 3)} |")
    return "\n".join(lines)


def sizes_table() -> str:
    """Depth, width, heads, parameters and FLOPs of the six named Stackformer configs."""
    lines = ["| config | code + position layers | width | heads | head dim | parameters | train GFLOPs/token |",
             "|---|---|---|---|---|---|---|"]
    for size in SIZES:
        m = load_train_config(f"configs/stackformer/{size}.yaml").model
        lines.append(f"| `{size}` | {m.n_code_layer} + {m.n_pos_layer} | {m.n_embd} | {m.n_head} | "
                     f"{m.n_embd // m.n_head} | {param_count(m):,} | {train_flops_per_token(m) / 1e9:.2f} |")
    return "\n".join(lines)


def _fixed(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals, or "< 0.01" where that would print as zero."""
    return f"{x:.{digits}f}" if x >= 0.5 * 10 ** -digits else f"< {10 ** -digits:.{digits}f}"


def tables() -> dict[str, dict[str, str]]:
    """{file in docs/: {block name: table}}."""
    return {"config.md": {"config-reference": reference_markdown(Config),
                          "tokenizer-config-reference": reference_markdown(TokenizerRunConfig),
                          "eval-config-reference": reference_markdown(EvalRunConfig),
                          "renamed-keys": renamed_markdown()},
            "scaling.md": {"model-sizes": sizes_table(), "scaling-plan": scaling_table()}}


def block(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, flags=re.S)
    return m.group(1) if m else ""


def update(docs: Path = DOCS) -> list[str]:
    """Rewrite every block; returns the files that changed."""
    changed = []
    for fname, blocks in tables().items():
        path = docs / fname
        text = new = path.read_text()
        for name, table in blocks.items():
            start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
            if start not in new:
                raise SystemExit(f"{path}: no {start} block")
            new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}",
                         new, flags=re.S)
        if new != text:
            path.write_text(new)
            changed.append(fname)
    return changed


if __name__ == "__main__":
    changed = update()
    print(f"docs: {', '.join(changed)} updated" if changed else "docs: already current")
