"""Shared plumbing for the thin entry points: argument parsing and the one-line user errors."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from mqscale.config import Config, ConfigError, load_config


class UserError(Exception):
    """Bad input from the user (a path, a file, a flag): shown as one line, exit status 2."""


def guarded(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run an entry point; user errors print one line on stderr and exit 2, with no traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        except (ValueError, OSError, RuntimeError) as e:
            if not _names_its_input(e):
                raise
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 2
    return wrapper


def _names_its_input(e: BaseException) -> bool:
    """Errors of the data layer and storage that already are one line naming the URL at fault."""
    from mqscale.data.fs import StorageError
    from mqscale.data.manifest import ManifestError
    from mqscale.train.checkpoint import CheckpointError
    return isinstance(e, (ManifestError, StorageError, CheckpointError))


def add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. model.n_embd=512 optim.lr=3e-4")


def config_from_args(ns: argparse.Namespace, root: type = Config):
    return load_config(ns.config, ns.overrides, root)


def add_storage_options_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", default="{}", type=storage_options,
                   help='JSON fsspec options, e.g. \'{"endpoint_url": "http://...", "anon": false}\'')


def storage_options(text: str) -> dict:
    """argparse type for --storage-options: a JSON object, or one clear line."""
    import json
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
