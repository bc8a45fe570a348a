"""The errors library code raises for bad input, each a one-line message naming the thing at fault.

Why one family: a command turns any ``MqscaleError`` into that line and exit status 2 (``cli.guarded``),
so library code never needs to know it runs under a command, and anything else that escapes is a
bug and keeps its traceback. The base classes beside ``MqscaleError`` keep the exceptions catchable
as what they are (a storage failure is an ``OSError``, a bad value a ``ValueError``).
"""
from __future__ import annotations


class MqscaleError(Exception):
    """Bad input (a file, a URL, a flag, a model, a config value); ``str(e)`` is the line to show."""


class ConfigError(MqscaleError, ValueError):
    """A user error in a config, naming the key and where it was set (a file, or the command line)."""


class StorageError(MqscaleError, OSError):
    """A storage operation that failed after the filesystem's own retries; the message names the URL."""


class ManifestError(MqscaleError, ValueError):
    """A shard manifest that is missing, malformed or of another format; the message names the URL."""


class ShardReadError(MqscaleError, RuntimeError):
    """A shard that cannot be read while the config says to fail (``data.on_shard_error: fail``)."""


class CheckpointError(MqscaleError, RuntimeError):
    """A training checkpoint that cannot be used; the message names it and why."""


class ArtifactError(MqscaleError, ValueError):
    """An exported model (``model.safetensors`` + ``config.json``) that cannot be used."""


class ConversionError(MqscaleError, ValueError):
    """An official checkpoint or config that does not convert to ours."""


class InputError(MqscaleError, ValueError):
    """Any other bad input: a prompt file, a tokenizer for another model, a weights file, a setting."""


class RunFailed(MqscaleError, RuntimeError):
    """A training run that failed in its workers, or stopped itself; the message says why.
    Commands print it as ``training failed: ...`` and exit 1 (the input was fine, the run was not)."""


class CompileError(MqscaleError, RuntimeError):
    """torch.compile cannot compile here (the message names why), or a compiled function keeps
    recompiling where its shapes were meant to stay fixed."""
