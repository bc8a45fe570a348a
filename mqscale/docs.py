"""python -m mqscale.docs: regenerate the README's config reference from the dataclasses."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from mqscale.config import REPO_ROOT, reference_markdown

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
