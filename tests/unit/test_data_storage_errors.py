"""An object store that goes away: every failure is a StorageError naming the URL, and the loader
counts and skips the shard or fails with one line naming it, as ``on_shard_error`` says.

The store is a real S3 API (moto's ThreadedMotoServer on loopback), started here on its own port
and then stopped, so the endpoint refuses connections as a dead one does: botocore raises
EndpointConnectionError, which is not an OSError, on open and on a read of an open file."""
from __future__ import annotations

import socket

import pytest

from mqscale.core import storage
from mqscale.core.errors import ShardReadError
from mqscale.data.config import DataConfig
from mqscale.data.loader import StreamingLoader, resolve_source
from mqscale.data.synthetic import token_set

BUCKET = "mqscale-down"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def downed_s3():
    """(url, storage options) of a token set on an S3 endpoint that has since gone down."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    running = True
    try:
        so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
              "config_kwargs": {"retries": {"max_attempts": 1}}}   # one try: the test needs no backoff
        import s3fs
        s3fs.S3FileSystem(**so).makedirs(BUCKET, exist_ok=True)  # moto's state outlives a server
        url = f"s3://{BUCKET}/tok"
        token_set(url, [20, 20], storage_options=so)
        src = resolve_source(url, "auto", so)                   # the manifest, read while it is up

        def stop():
            nonlocal running
            server.stop()
            running = False
        yield {"url": url, "so": so, "src": src, "stop": stop}
    finally:
        if running:
            server.stop()


def cfg(so, **kw):
    return DataConfig(batch_size=8, num_workers=0, shuffle_buffer=8, seed=0, storage_options=so, **kw)


def test_a_down_endpoint_is_counted_and_skipped(downed_s3):
    downed_s3["stop"]()
    loader = StreamingLoader(downed_s3["url"], cfg(downed_s3["so"], on_shard_error="skip"),
                             source=downed_s3["src"])
    batches = list(loader)                                      # no exception: both shards skipped
    assert len(batches) == loader.batches_per_epoch == 5
    assert not any(b["mask"].any() for b in batches)
    st = loader.stats()
    assert st["unreadable_shards"] == 2 and st["samples"] == 0
    assert any("tokens-000000.tar: unreadable, skipped" in e and "EndpointConnectionError" in e
               for e in loader.events)


def test_a_down_endpoint_fails_the_run_with_one_line_naming_the_shard(downed_s3):
    downed_s3["stop"]()
    loader = StreamingLoader(downed_s3["url"], cfg(downed_s3["so"]), source=downed_s3["src"])
    with pytest.raises(ShardReadError) as err:
        list(loader)
    msg = str(err.value)
    assert msg.startswith(f"shard s3://{BUCKET}/tok/tokens-00000") and "cannot be read" in msg
    assert "EndpointConnectionError" in msg and "\n" not in msg


def test_open_and_read_failures_are_storage_errors_naming_the_url(downed_s3):
    url = f"s3://{BUCKET}/tok/tokens-000001.tar"
    f = storage.open_read(url, downed_s3["so"])                      # opened while the endpoint is up
    downed_s3["stop"]()
    with pytest.raises(storage.StorageError, match=f"^{url}: cannot read \\(EndpointConnectionError"):
        f.read(1 << 16)
    f.close()                                                   # closing a dead read loses nothing
    with pytest.raises(storage.StorageError, match=f"^{url}: cannot open \\(EndpointConnectionError"):
        storage.open_read(url, downed_s3["so"])
    with pytest.raises(storage.StorageError, match="manifest.json: cannot open"):
        StreamingLoader(downed_s3["url"], cfg(downed_s3["so"]))
