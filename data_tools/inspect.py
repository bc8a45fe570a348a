"""python -m data_tools.inspect URL [--json]: counts, sizes and content statistics of a shard set.

URL is a manifest, its directory, or a brace pattern of shards, on any fsspec URL. Every sample
is decoded. Token shards also show the length histogram, codebook usage, the class histogram and
the mean kept-position map; image shards the class histogram and image sizes.
"""
from __future__ import annotations

import argparse

from data_tools.scan import print_report, scan
from mqscale.core.cli import add_storage_options_arg, guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_options_arg(p)
    ns = p.parse_args(argv)
    rep, src = scan(ns.url, ns.storage_options, check_sha=False)
    print_report(rep, src, ns.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
