"""python -m mqscale.docs: regenerate the README's config reference from the dataclasses."""
from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from mqscale.config import REPO_ROOT, Config, to_dict


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def reference_markdown(root: type = Config) -> str:
    """The config reference table of a run config class for the README (kept in sync by a test)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints_of = typing.get_type_hints
    for sec in dataclasses.fields(root):
        cls = hints_of(root)[sec.name]
        if not dataclasses.is_dataclass(cls):
            lines.append(f"| `{sec.name}` | {cls.__name__} | `{sec.default}` | {sec.metadata.get('doc', '')} |")
            continue
        hints = hints_of(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = _type_name(hints[f.name])
            rng = ", ".join(f"{op} {f.metadata[k]}" for k, op in
                            (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                            if f.metadata.get(k) is not None)
            doc = f.metadata.get("doc", "") + (f" ({rng})" if rng else "")
            lines.append(f"| `{sec.name}.{f.name}` | {tp} | `{to_dict(default)}` | {doc} |")
    return "\n".join(lines)


SIZES = ("debug", "307m", "607m", "1.4b", "3b", "7b")


def scaling_table() -> str:
    """What fits where and how fast (``mqscale.plan`` at its defaults: 80 GB GPUs, 40% MFU of an
    H100's dense bf16 peak, one ImageNet epoch), for the six named Stackformer configs."""
    from mqscale.config import load_config
    from mqscale.plan import plan
    lines = ["| config | params | GFLOP/token | fits on 1 GPU | fits on 8 GPUs | tokens/s, 8 GPUs | "
             "hours/epoch, 8 GPUs | hours/epoch, 64 GPUs |", "|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        cfg = load_config(f"configs/stackformer/{size}.yaml")
        one, eight, many = plan(cfg, 1, 80.0), plan(cfg, 8, 80.0), plan(cfg, 8, 80.0, nodes=8)
        params = one["params"] / 1e6
        lines.append(f"| {size} | {params:,.{1 if params < 10 else 0}f}M | {one['train_flops_per_token'] / 1e9:.2f} | "
                     f"{one['smallest_fit'] or 'no'} | {eight['smallest_fit'] or 'no'} | "
                     f"{eight['tokens_per_s']:,.0f} | {_fixed(24 * eight['days_per_epoch'], 2)} | "
                     f"{_fixed(24 * many['days_per_epoch'], 3)} |")
    return "\n".join(lines)


def sizes_table() -> str:
    """Depth, width, heads, parameters and FLOPs of the six named Stackformer configs."""
    from mqscale.config import load_config
    from mqscale.models import param_count, train_flops_per_token
    lines = ["| config | code + position layers | width | heads | head dim | parameters | train GFLOPs/token |",
             "|---|---|---|---|---|---|---|"]
    for size in SIZES:
        m = load_config(f"configs/stackformer/{size}.yaml").model
        lines.append(f"| `{size}` | {m.n_code_layer} + {m.n_pos_layer} | {m.n_embd} | {m.n_head} | "
                     f"{m.n_embd // m.n_head} | {param_count(m):,} | {train_flops_per_token(m) / 1e9:.2f} |")
    return "\n".join(lines)


def _fixed(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals, or "< 0.01" where that would print as zero."""
    return f"{x:.{digits}f}" if x >= 0.5 * 10 ** -digits else f"< {10 ** -digits:.{digits}f}"


def tables() -> dict[str, str]:
    from mqscale.tokenizer_config import TokenizerRunConfig
    return {"config-reference": reference_markdown(Config),
            "tokenizer-config-reference": reference_markdown(TokenizerRunConfig),
            "scaling-plan": scaling_table(), "model-sizes": sizes_table()}


def readme_block(text: str, name: str = "config-reference") -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, flags=re.S)
    return m.group(1) if m else ""


def update(path: Path) -> bool:
    text = new = path.read_text()
    for name, table in tables().items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}",
                     new, flags=re.S)
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "README.md")
    print("README config reference " + ("updated" if changed else "already current"))
