r"""python -m mqscale.tokenize --tokenizer CKPT --input URL_OR_MANIFEST --output URL [options]

Pre-tokenizes image shards once into token shards (codes + raster-ordered positions + the
condition) with a frozen MQ-VAE: input shard i becomes output shard i, each committed
atomically; a rerun keeps shards that are complete and verified, so a killed run is finished by
running it again, byte-identically. Runs on a local Ray by default (``--workers`` actors, each
holding the model), on a cluster with ``--address``, or in this process with ``--workers 0``.
Keep ``--batch-size`` (and the other options) when resuming: shards made under other options are
rewritten, never mixed. The summary (images in, sequences out, skips by reason, codebook usage,
mean kept-position map) adds up every shard of the output, also those kept from an earlier run;
images/s counts only the images encoded in this run.

On a Ray cluster (``--address``) the actors run on other machines, so every node needs:
  - mqscale importable (installed in the node image, or shipped with the job's runtime env);
  - the --tokenizer directory at the same absolute path (a shared filesystem; it is read as a
    local directory, not through fsspec), and --text-tokenizer readable (local path or s3://);
  - --input and --output reachable: object storage (s3://, with --storage-options or the node's
    credentials) or a shared filesystem, never a directory local to the driver.
The simplest way is to submit the run as a Ray job from the repository root, as for training:
  ray job submit --address http://HEAD:8265 --runtime-env launchers/runtime_env.yaml \
      --working-dir . -- python -m mqscale.tokenize --address auto --workers N \
      --tokenizer /shared/tok --input s3://bucket/images --output s3://bucket/tokens
(the runtime env uploads this checkout, puts it on every worker's path and installs the
dependencies; a job's driver finds the cluster by itself, so ``--address auto``). Connecting from
outside with ``--address ray://HEAD:10001`` ships nothing: mqscale must then already be installed on
every node.
"""
from __future__ import annotations

import argparse

from mqscale.core.cli import UserError, add_storage_options_arg, guarded
from mqscale.core.storage import absolute
from mqscale.tokenize.jobs import Options
from mqscale.tokenize.pool import run, summary_lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mqscale.tokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="exported tokenizer (a train_tokenizer checkpoint or "
                   "the output of `mqscale.convert official-mqvae`)")
    p.add_argument("--input", required=True, help="image shards: manifest, its directory, or a brace pattern")
    p.add_argument("--output", required=True, help="output URL for token shards + manifest.json")
    p.add_argument("--workers", type=int, default=1, help="Ray actors (0: run in this process, no Ray)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray); needs --workers >= 1")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per encode batch; part of the run's options: keep it when resuming")
    p.add_argument("--cond", default="auto", choices=["auto", "none", "class", "text"],
                   help="auto: class when the input has a class map or labels, else text when it has captions")
    p.add_argument("--flip", action="store_true", help="also tokenize each image's mirror (training picks one)")
    p.add_argument("--text-tokenizer", default="bytes", help="'bytes' or a HuggingFace tokenizers JSON path")
    p.add_argument("--text-len", type=int, default=32, help="T: text ids per caption (paper: 32)")
    p.add_argument("--on-size-mismatch", default="resize", choices=["resize", "skip"],
                   help="an image not at the tokenizer's resolution is resized + center-cropped, or skipped")
    p.add_argument("--chunk-size", type=int, default=256, help="sequences per tar member")
    add_storage_options_arg(p)
    p.add_argument("--no-progress", action="store_true")
    return p


@guarded
def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.workers < 0 or ns.batch_size < 1 or ns.chunk_size < 1 or ns.text_len < 1:
        raise UserError("--workers must be >= 0 and --batch-size, --chunk-size, --text-len >= 1")
    text_tokenizer = ns.text_tokenizer if ns.text_tokenizer == "bytes" else absolute(ns.text_tokenizer)
    opts = Options(tokenizer=absolute(ns.tokenizer), input=absolute(ns.input), output=absolute(ns.output),
                   cond=ns.cond, flip=ns.flip, text_tokenizer=text_tokenizer, text_len=ns.text_len,
                   on_size_mismatch=ns.on_size_mismatch, batch_size=ns.batch_size, chunk_size=ns.chunk_size,
                   storage_options=ns.storage_options)
    summary = run(opts, ns.workers, ns.address, progress=not ns.no_progress)
    print("\n".join(summary_lines(summary)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
