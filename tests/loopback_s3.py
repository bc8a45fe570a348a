"""A real S3 API on loopback: moto's ThreadedMotoServer, as s3fs's own test suite uses it."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def loopback_s3(bucket: str | None = None) -> Iterator[dict]:
    """Starts the server on a free port; yields the fsspec storage options that reach it."""
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(k, "testing")
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    try:
        if bucket:
            import s3fs
            s3fs.S3FileSystem(**opts).mkdir(bucket)
        yield opts
    finally:
        server.stop()
