"""python -m data_tools.verify URL: check a shard set end to end; exit 1 if anything is wrong.

Checks every shard's sha256 against the manifest, decodes every sample, and lists the corrupt
ones (shard:key and why), plus shards holding other counts than the manifest promises.
"""
from __future__ import annotations

import argparse

from data_tools.scan import print_report, scan
from mqscale.core.cli import add_storage_options_arg, guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="manifest or its directory (a brace pattern skips the sha256 check)")
    p.add_argument("--json", action="store_true")
    add_storage_options_arg(p)
    ns = p.parse_args(argv)
    rep, src = scan(ns.url, ns.storage_options, check_sha=True)
    print_report(rep, src, ns.json, show_bad=1000)
    if not ns.json:
        print(("OK: " if rep.ok else "FAILED: ") + f"{rep.shards} shards, {rep.samples:,} samples decoded, "
              f"{len(rep.bad)} bad samples, {len(rep.sha_mismatch)} sha256 mismatches")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
