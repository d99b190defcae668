"""A local S3 for tests and benchmarks: ``moto_server`` on 127.0.0.1 (:func:`local_s3`), and an
HTTP proxy in front of it (:class:`S3Proxy`) that adds latency or answers 503 SlowDown to chosen
requests, so the jobs meet real S3 behaviour through s3fs and botocore."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
              b"<Message>Service is unavailable, try again</Message></Error>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(bucket: str) -> Iterator[dict]:
    """A moto S3 server with ``bucket``; yields ``{"options": fsspec options, "endpoint", "bucket"}``."""
    port = free_port()
    # Objects up to 1 GiB stay in moto's memory (its default spills every object over 5 MB to a
    # temporary file: checkpoints and models cost twice the CPU, most of it the kernel's).
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
               MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=str(2**30))
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        options = {"key": "test", "secret": "test",
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        yield {"options": options, "endpoint": endpoint, "bucket": bucket}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class S3Proxy:
    """``endpoint`` forwards to ``upstream`` after ``latency_s`` (a distant store); ``fail_keys``
    (substrings of the path) answer 503 to every request while set, and ``fail_next`` answers 503
    to that many requests whose path holds ``fail_next_key`` (any request when empty)."""

    def __init__(self, upstream: str, latency_s: float = 0.0) -> None:
        self.upstream = urlsplit(upstream)
        self.latency_s = latency_s
        self.requests = 0
        """Requests forwarded or failed so far."""
        self.fail_keys: set[str] = set()
        self.fail_next = 0
        self.fail_next_key = ""
        self.failed: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out as two writes: with Nagle's algorithm the body waits for the
            # client's delayed ACK (40 ms on Linux), which a real store does not add
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                if proxy._should_fail(self.command, self.path):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                resp, data = self._upstream(self.command, self.path, body, headers)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _upstream(self, method: str, path: str, body: bytes, headers: dict):
                # one kept-alive connection to the store per client connection (a connection per
                # request costs the store a thread and a handshake each: CPU the jobs then lack)
                for attempt in range(2):
                    conn = getattr(self, "conn", None)
                    if conn is None:
                        conn = self.conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                                      timeout=60)
                    try:
                        conn.request(method, path, body=body, headers=headers)
                        resp = conn.getresponse()
                        return resp, resp.read()
                    except (http.client.HTTPException, OSError):
                        conn.close()
                        self.conn = None
                        if attempt:
                            raise

            def finish(self) -> None:
                super().finish()
                if getattr(self, "conn", None) is not None:
                    self.conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            self.requests += 1
            if self.fail_next > 0 and self.fail_next_key in path:
                self.fail_next -= 1
                self.failed.append(f"{method} {path}")
                return True
            if any(k in path for k in self.fail_keys):
                self.failed.append(f"{method} {path}")
                return True
        return False

    def options(self, base: dict) -> dict:
        """fsspec options for this endpoint; botocore's own retries off so aver's are what is tested."""
        return {**base, "client_kwargs": {**base["client_kwargs"], "endpoint_url": self.endpoint},
                "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
