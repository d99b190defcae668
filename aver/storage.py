"""Reading and writing local paths and fsspec URIs (``s3://`` included) safely.

Writes become visible only when complete: local files are written under a temporary name in
the same folder and renamed; object stores (S3) publish an object only when its upload ends.
URIs are redacted before they reach a message or a log.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import fsspec

_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-[a-z-]*|signature|sig|token|access_token|key|secret|password|aws[a-z_]*)=)[^&#]*"
)
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact(uri: str) -> str:
    """``uri`` with any user:password part and secret query parameters replaced by ``***``."""
    uri = _USERINFO.sub(r"\1***@", str(uri))
    return _SECRET_QUERY.sub(r"\1***", uri)


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or any fsspec URI.

    For chained URIs (``zip://member::s3://bucket/a.zip``) the options go to the outermost store.
    """
    uri = str(uri)
    options = dict(storage_options or {})
    if "::" in uri and options:
        outer = uri.rsplit("::", 1)[1]
        options = {outer.split("://", 1)[0] if "://" in outer else "file": options}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or (str(uri).startswith("file://") and "::" not in str(uri))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """All bytes of ``uri``; a missing file raises ``FileNotFoundError`` naming the redacted URI."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {redact(uri)}") from None


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` so that no reader ever sees a partial file."""
    fs, path = url_to_fs(uri, storage_options)
    if is_local(uri):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        # A single PUT: the object store publishes it only once the upload has completed.
        with fs.open(path, "wb") as f:
            f.write(data)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    fs.invalidate_cache()  # s3fs caches listings; a stale "missing" would redo finished work
    return fs.exists(path)
