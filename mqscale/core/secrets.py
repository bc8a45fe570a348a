"""Credentials kept out of what is shown and what is stored.

Why: ``storage_options`` carry endpoint keys and tokens. A config printed to a console, a log or
TensorBoard shows them redacted; a config stored with an artifact (checkpoint ``run_config.json``,
exported ``config.json``, manifests) leaves them out, so whoever later reads the artifact
(sampling, evaluation, a resumed run elsewhere) brings their own, from the environment or the
command line. Endpoints and other options stay.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mqscale.core.config import to_dict

SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session", "auth", "signature")


def redacted(value: Any, drop: bool = False) -> Any:
    """A copy of a config (dataclass or plain dict) safe to print or log: under any
    ``storage_options`` (and in any nested mapping there) every entry whose name suggests a
    credential is replaced by ``<redacted>`` (``drop``: removed)."""
    def walk(v: Any, secret_scope: bool) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                inside = secret_scope or k == "storage_options"
                if secret_scope and any(w in str(k).lower() for w in SECRET_WORDS) and not isinstance(x, dict):
                    if not drop:
                        out[k] = "<redacted>"
                else:
                    out[k] = walk(x, inside)
            return out
        if isinstance(v, (list, tuple)):
            return [walk(x, secret_scope) for x in v]
        return v
    return walk(to_dict(value) if dataclasses.is_dataclass(value) else value, False)


def without_credentials(value: Any) -> dict:
    """The config as it is stored with an artifact: credentials left out (see the module doc)."""
    return redacted(value, drop=True)
