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


def reference_markdown() -> str:
    """The config reference table for the README (kept in sync by a test)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints_of = typing.get_type_hints
    for sec in dataclasses.fields(Config):
        cls = hints_of(Config)[sec.name]
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


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_block(text: str) -> str:
    m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, flags=re.S)
    return m.group(1) if m else ""


def update(path: Path) -> bool:
    text = path.read_text()
    new = text.replace(f"{START}\n{readme_block(text)}\n{END}", f"{START}\n{reference_markdown()}\n{END}")
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "README.md")
    print("README config reference " + ("updated" if changed else "already current"))
