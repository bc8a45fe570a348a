"""Plumbing of the thin entry points: argument parsing, and every library error as one line.

A command is ``@guarded``: any ``MqscaleError`` the library raises (a config key, a URL, a
checkpoint, a model) is printed as one line on stderr with exit status 2, no traceback; anything
else is a bug and keeps its traceback. ``UserError`` is for what only a command knows is wrong
(its own flags); library code raises the errors of ``core.errors``.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable

from mqscale.core.config import load_config
from mqscale.core.errors import ConfigError, MqscaleError


class UserError(MqscaleError):
    """A bad command-line flag or argument, found by the command itself."""


def guarded(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run an entry point; library errors print one line on stderr and exit 2, with no traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
        except MqscaleError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 2
    return wrapper


def add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. model.n_embd=512 optim.lr=3e-4")


def config_from_args(ns: argparse.Namespace, root: type):
    return load_config(ns.config, ns.overrides, root)


def add_storage_options_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", default="{}", type=storage_options,
                   help='JSON fsspec options, e.g. \'{"endpoint_url": "http://...", "anon": false}\'')


def storage_options(text: str) -> dict:
    """argparse type for --storage-options: a JSON object, or one clear line."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
