"""python -m mqscale.checkpoint verify URL [--storage-options JSON] [--json]

Checks a training checkpoint, or every checkpoint of a run, against its completion marker
(``mqscale_complete.json``: written last, listing every file's size and sha256): a checkpoint is
OK only when the marker is there and every file it lists is present, whole and unchanged. Exit
status 0 when everything checked is OK (for a run: when its newest checkpoint is), 1 otherwise.
Stackformer and tokenizer runs keep their checkpoints the same way (``core/checkpoint.py``).

This is the check training runs before it loads a checkpoint. The trust boundary: DeepSpeed's
own checkpoint files (Stackformer runs) are Python pickles that ``load_checkpoint`` opens with
``torch.load(weights_only=False)``, so loading one runs whatever it holds. Training resumes only
from checkpoints that verify against their marker: its own run's (what it wrote itself), or one
you name with ``--resume-from``, which you must trust as you trust code. The marker proves the
files are whole and unchanged since they were written, not who wrote them. Everything mqscale
exports or imports (``mqscale.export``, ``mqscale.convert``, tokenizer checkpoints) is
safetensors or is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import json
import sys

from mqscale.core import storage
from mqscale.core.checkpoint import MARKER, CheckpointStore
from mqscale.core.cli import add_storage_options_arg, guarded
from mqscale.core.errors import CheckpointError


def verify_url(url: str, storage_options: dict | None = None) -> list[dict]:
    """One record per checkpoint checked (a checkpoint URL: itself; a run: all of its, newest first)."""
    store = CheckpointStore(url, storage_options)
    named = url.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")
    if named or storage.exists(storage.join(url, MARKER), storage_options):
        try:
            found = store.open_url(url)
        except CheckpointError as e:
            return [{"url": url, "ok": False, "why": str(e).split(": ", 1)[-1]}]
        return [{"url": found.url, "step": found.step, "world": found.marker.get("world"),
                 "files": len(found.marker["files"]), "ok": True}]
    found_all, incomplete = store.scan()
    records = [{"url": storage.join(url, name), "ok": False, "why": f"{why}: incomplete (never resumed)"}
               for name, why in sorted(incomplete.items())]
    for found in found_all:
        why = store.verify(found)
        records.append({"url": found.url, "step": found.step, "world": found.marker.get("world"),
                        "files": len(found.marker["files"]), "ok": why is None, **({"why": why} if why else {})})
    if not records:
        raise CheckpointError(f"{url}: neither a checkpoint (no {MARKER}) nor a run directory holding checkpoints")
    return records


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check a checkpoint or a run's checkpoints against their markers")
    v.add_argument("url", help="a checkpoint directory or a run directory (local path or any fsspec URL)")
    v.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    add_storage_options_arg(v)
    ns = p.parse_args(argv)
    records = verify_url(ns.url, ns.storage_options)
    newest = next((r for r in records if "step" in r), records[0])
    ok = newest["ok"]
    if ns.json:
        print(json.dumps({"ok": ok, "checkpoints": records}, indent=1))
    else:
        for r in records:
            what = f"step {r['step']}, {r['files']} files, saved by {r['world']} workers" if "step" in r else ""
            print(f"{'OK     ' if r['ok'] else 'DAMAGED'} {r['url']}" + (f"  ({what})" if what else "")
                  + (f": {r['why']}" if not r["ok"] else ""), file=sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
