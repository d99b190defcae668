"""Fetching Google FEC images from their URLs into the flat layout the readers expect.

Each URL is fetched once (skipped when its file exists), with a timeout and retries with
backoff; every URL gets a status row (``ok``/``failed`` with the error). Only http(s) URLs are
followed (``file://`` only with ``allow_file_urls``, which the offline demo corpus needs: a
manifest must not copy local files into the output); what is written is always ``<images>/<fec_image_name(url)>``, so a
manifest cannot make the job write anywhere else.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from aver.console import Progress
from aver.data.manifests import fec_image_name, read_fec
from aver.io.parts import join, write_table
from aver.io.storage import exists, redact, write_bytes_atomic

FETCH_SCHEMA = pa.schema([("url", pa.string()), ("file", pa.string()), ("status", pa.string()),
                          ("error", pa.string()), ("attempts", pa.int32()), ("bytes", pa.int64())])


@dataclass
class FetchConfig:
    manifest: tuple[str, ...]
    """Google FEC faceexp-comparison-data-{train,test}-public.csv, one or several (no header; local or
    fsspec URIs): an image several of them name is fetched once."""
    output: str
    """Folder for images/ and fetch_status/: the CSV's own folder, where every job looks for the
    images by default (images/ beside the CSV)."""
    timeout_s: float = 10.0
    """Per-request timeout."""
    retries: int = 3
    """Attempts per URL beyond the first."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry."""
    workers: int = 16
    """Concurrent downloads."""
    max_bytes: int = 20 * 2**20
    """Responses larger than this are refused."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for manifest and output."""
    allow_file_urls: bool = False
    """Also copy ``file://`` URLs (the demo corpus's); off, they get a ``failed`` row."""

    def __post_init__(self) -> None:
        self.manifest = (self.manifest,) if isinstance(self.manifest, str) else tuple(self.manifest)
        if not self.manifest:
            raise ValueError("fetch_fec needs at least one manifest")
        names = [status_name(m) for m in self.manifest]
        if len(set(names)) != len(names):
            raise ValueError(f"manifests of one file name would share one fetch_status part: {', '.join(self.manifest)}")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.workers < 1 or self.max_bytes < 1:
            raise ValueError("timeout_s > 0, retries >= 0, backoff_s >= 0, workers >= 1, max_bytes >= 1")


def _download(url: str, cfg: FetchConfig) -> bytes:
    schemes = ("http://", "https://", "file://") if cfg.allow_file_urls else ("http://", "https://")
    if not url.lower().startswith(schemes):
        raise ValueError("only http(s) URLs are fetched" + ("" if cfg.allow_file_urls else
                                                             " (file:// needs --allow-file-urls)"))
    req = urllib.request.Request(url, headers={"User-Agent": "aver-fec-fetch/1"})
    with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:  # noqa: S310 - scheme checked above
        data = resp.read(cfg.max_bytes + 1)
    if len(data) > cfg.max_bytes:
        raise ValueError(f"larger than {cfg.max_bytes} bytes")
    if not data:
        raise ValueError("empty response")
    return data


def fetch_one(url: str, cfg: FetchConfig) -> dict:
    target = join(cfg.output, "images", fec_image_name(url))
    row = {"url": redact(url), "file": fec_image_name(url), "attempts": 0, "bytes": None, "error": None}
    if exists(target, cfg.storage_options):
        return {**row, "status": "ok"}
    error = ""
    for attempt in range(cfg.retries + 1):
        row["attempts"] = attempt + 1
        try:
            data = _download(url, cfg)
            write_bytes_atomic(target, data, cfg.storage_options)
            return {**row, "status": "ok", "bytes": len(data)}
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if 400 <= e.code < 500 and e.code not in (408, 429):
                break  # a dead link stays dead
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if isinstance(e, ValueError):
                break
        time.sleep(cfg.backoff_s * 2 ** attempt)
    return {**row, "status": "failed", "error": error}


def status_name(manifest: str) -> str:
    """The manifest's file name without its extension: its part is fetch_status/<name>.parquet."""
    return manifest.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def run(cfg: FetchConfig) -> dict[str, int]:
    """Fetch every image the manifests name, once each; writes fetch_status/<manifest>.parquet per
    manifest (the rows of its images); returns the counts over the images."""
    manifests = {uri: read_fec(uri, storage_options=cfg.storage_options or None) for uri in cfg.manifest}
    wanted = {uri: sorted({f["url"] for r in m.records for f in r["faces"]}) for uri, m in manifests.items()}
    urls = sorted(set().union(*wanted.values()))
    progress = Progress("fetch_fec", len(urls), "images")
    rows = {}
    with ThreadPoolExecutor(cfg.workers) as pool:
        for url, row in zip(urls, pool.map(lambda u: fetch_one(u, cfg), urls)):
            rows[url] = row
            progress.update()
    progress.close()
    for uri, its_urls in wanted.items():
        write_table(join(cfg.output, "fetch_status", f"{status_name(uri)}.parquet"),
                    pa.Table.from_pylist([rows[u] for u in its_urls], schema=FETCH_SCHEMA), cfg.storage_options)
    counts = {"ok": sum(r["status"] == "ok" for r in rows.values()),
              "failed": sum(r["status"] == "failed" for r in rows.values()),
              "rejected_rows": sum(len(m.rejected) for m in manifests.values())}
    print("fetch_fec: " + ", ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return counts
