"""A fault-injecting HTTP proxy in front of the local moto S3: answers 503 SlowDown to chosen
requests, so the jobs meet real S3 errors through s3fs and botocore (on 127.0.0.1 only)."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
              b"<Message>Service is unavailable, try again</Message></Error>")


class FaultyS3:
    """``endpoint`` forwards to ``upstream``; ``fail_keys`` (substrings of the path) answer 503 to
    every request while set, and ``fail_next`` answers 503 to that many requests whose path holds
    ``fail_next_key`` (any request when empty)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.fail_keys: set[str] = set()
        self.fail_next = 0
        self.fail_next_key = ""
        self.failed: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._should_fail(self.command, self.path):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _should_fail(self, method: str, path: str) -> bool:
        with self._lock:
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
