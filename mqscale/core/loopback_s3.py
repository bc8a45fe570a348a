"""S3 on loopback, for the tests and the benchmarks: a real S3 API, and a proxy that fails on purpose.

``loopback_s3()`` starts moto's ``ThreadedMotoServer`` (as s3fs's own test suite does) on a free
port and yields the fsspec storage options that reach it. ``FlakyS3`` sits in front of it:
every request is forwarded to the real S3 API, except that a seeded share of them fails
transiently, as S3 does under load: half before the request reaches the server (503 SlowDown:
nothing happened), half after it (500 InternalError: a PUT or a multipart part may have been
applied, and its retry must be harmless). Requests whose key contains a ``denied`` fragment get
a permanent 403 AccessDenied. The clients under test (s3fs/aiobotocore, botocore, Ray's pyarrow
filesystem over s3fs) see a real endpoint: nothing else in mqscale knows the proxy is there.
"""
from __future__ import annotations

import http.client
import os
import random
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

import s3fs


@contextmanager
def loopback_s3(bucket: str | None = None) -> Iterator[dict]:
    """Starts the server on a free port; yields the fsspec storage options that reach it."""
    from moto.server import ThreadedMotoServer  # moto: a dev dependency (tests and benchmarks only)
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
            s3fs.S3FileSystem(**opts).mkdir(bucket)
        yield opts
    finally:
        server.stop()


HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


def _error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>flaky</RequestId></Error>").encode()


class FlakyS3:
    def __init__(self, upstream: str, failure_rate: float = 0.0, seed: int = 0):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.failure_rate, self.denied = failure_rate, set()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = self.failed_before = self.failed_after = self.refused = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def injected(self) -> int:
        return self.failed_before + self.failed_after

    def __enter__(self) -> "FlakyS3":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fate(self, path: str) -> str:
        with self.lock:
            self.requests += 1
            if any(d in path for d in self.denied):
                self.refused += 1
                return "deny"
            if self.rng.random() < self.failure_rate:
                if self.rng.random() < 0.5:
                    self.failed_before += 1
                    return "before"
                self.failed_after += 1
                return "after"
            return "pass"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                # a HEAD answer has no body, but its Content-Length is the object's size: keep it
                keep_length = self.command == "HEAD" and any(k.lower() == "content-length" for k, _ in headers)
                for k, v in headers:
                    if k.lower() not in HOP and (keep_length or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not keep_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes):
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                r = conn.getresponse()
                data = r.read()
                conn.close()
                return r.status, r.getheaders(), data

            def _any(self):
                body = self._body()
                fate = proxy._fate(self.path)
                xml = [("Content-Type", "application/xml")]
                if fate == "deny":
                    return self._reply(403, xml, _error("AccessDenied", "Access Denied"))
                if fate == "before":
                    return self._reply(503, xml, _error("SlowDown", "Please reduce your request rate."))
                status, headers, data = self._forward(body)
                if fate == "after":
                    return self._reply(500, xml, _error("InternalError", "We encountered an internal error."))
                self._reply(status, headers, data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
