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
    r"(?i)([?&](?:x-amz-[a-z-]*|signature|sig|token|access_token|key|secret|password|aws[a-z_]*)=)[^&#\\s'\"]*"
)
# user-info of a URI anywhere in a text (``s3://KEY:SECRET@bucket``, ``https://user:pw@host``). A
# raw AWS secret may hold "/" and "+": after "user:" everything up to the "@" is the password.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/@:\s'\"]+:[^@\s'\"]*|[^/@:\s'\"]+)@")
_USERINFO_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(?:([^/@:\s]+):([^@\s]*)|([^/@:\s]+))@(.*)$", re.S)
_SECRET_OPTION = re.compile(r"(?i)(secret|token|password|passwd|key|credential|signature)")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_secrets: set[str] = set()


def register_secrets(storage_options: dict[str, Any] | None) -> None:
    """Remember the credential values in ``storage_options`` (nested too) so that :func:`redact`
    removes them from any text, whatever library wrote it. Call it in every process that handles
    the options (driver, Ray actors and tasks)."""

    def walk(obj: Any, secret: bool) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, secret or bool(_SECRET_OPTION.search(str(k))))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, secret)
        elif secret and isinstance(obj, str) and len(obj) >= 8:  # shorter values are no real credential
            _secrets.add(obj)

    walk(storage_options or {}, False)


def redact(text: str) -> str:
    """``text`` (a URI or any message) with URI user-info, secret query parameters, registered
    credential values and the AWS credentials of the environment replaced by ``***``."""
    text = _USERINFO.sub(r"\1***@", str(text))
    text = _SECRET_QUERY.sub(r"\1***", text)
    values = _secrets | {os.environ[k] for k in _SECRET_ENV if len(os.environ.get(k, "")) >= 8}
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def split_credentials(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``s3://KEY:SECRET@bucket/path`` -> (``s3://bucket/path``, options with ``key``/``secret``).

    Libraries echo the URIs they are given in their errors; a URI with user-info is therefore
    never handed to one. Only S3 URIs may carry credentials this way; any other URI with
    user-info is refused (ValueError, redacted)."""
    uri = str(uri)
    options = dict(storage_options or {})
    m = _USERINFO_URI.match(uri)
    if not m:
        return uri, options
    protocol, key, secret, user, rest = m.groups()
    if protocol.lower() not in ("s3", "s3a"):
        raise ValueError(f"credentials inside a {protocol}:// URI are not accepted: {redact(uri)}; "
                         "use --storage-options or the environment")
    from urllib.parse import unquote

    key, secret = unquote(key or user), unquote(secret or "")
    register_secrets({"key": key, "secret": secret})
    for name, value in (("key", key), ("secret", secret)):
        if value and options.get(name, value) != value:
            raise ValueError(f"{redact(uri)}: its credentials differ from the storage options' {name}")
        if value:
            options[name] = value
    return f"{protocol}://{rest}", options


def has_userinfo(uri: str) -> bool:
    """Whether ``uri`` carries user-info (credentials) before its host or bucket."""
    return bool(_USERINFO_URI.match(str(uri)))


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


def absolute(uri: str | None) -> str | None:
    """``uri`` with a relative local path made absolute here: processes Ray starts elsewhere (a
    Ray Train worker runs in its run's folder) read the same file. None or "" (not given) stays."""
    return uri if not uri or "://" in uri or os.path.isabs(uri) else os.path.abspath(uri)


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


def find_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Every file under the folder ``path``, as ``fs.find`` lists them. A local folder is walked
    instead: fsspec's local ``find`` makes an info dict per file first, ~700 bytes a file held at the
    listing's peak (at 100k files, 72 of the planning driver's 158 MB: bench (g)). As ``find``, it
    does not descend into a linked folder but lists the link. Stores keep ``find``: one paginated
    recursive listing, where a walk would be a request per folder."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        return fs.find(path)
    found = []
    for root, folders, files in os.walk(path):
        found += [os.path.join(root, f) for f in files]
        found += [os.path.join(root, d) for d in folders if os.path.islink(os.path.join(root, d))]
    return found
