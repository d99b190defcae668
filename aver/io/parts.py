"""Output folders shared by the jobs: Parquet parts written atomically, one per unit of work,
with the unit's ``status/`` part written last so that its presence means "complete"."""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from aver.io.storage import is_local, url_to_fs, write_bytes_atomic

ROW_GROUP_ROWS = 1024
"""Rows per Parquet row group: a reader can take a part a slice at a time (distill reads faces
parts so); parts written before had one row group, which is read whole."""

STATUS_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("n_frames", pa.int64()),
    ("duration_s", pa.float64()),
    ("scoring_version", pa.int32()),  # score_videos: what its rows mean (null for the other jobs)
])


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def write_table(uri: str, table: pa.Table, storage_options: dict | None = None) -> None:
    """Write ``table`` as one Parquet file at ``uri``; never visible half-written."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    write_bytes_atomic(uri, buf.getvalue(), storage_options)


def write_tables(uri: str, schema: pa.Schema, tables: Iterable[pa.Table], storage_options: dict | None = None) -> int:
    """Write the ``tables`` one after the other as one Parquet file at ``uri``, never visible
    half-written, holding one table at a time: they stream into a temporary file (beside ``uri``
    when local, then renamed; else in the temp folder, then uploaded: an object store publishes it
    only once the upload completes). Returns the rows written."""
    fs, path = url_to_fs(uri, storage_options)
    folder = os.path.dirname(os.path.abspath(path)) if is_local(uri) else None
    if folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    n = 0
    try:
        with os.fdopen(fd, "wb") as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table.cast(schema), row_group_size=ROW_GROUP_ROWS)
                n += len(table)
        if folder:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def status_table(rows: list[dict[str, Any]], id_column: str = "video_id") -> pa.Table:
    """Status rows in the shared schema; jobs over items that are not videos name the id ``item_id``."""
    schema = STATUS_SCHEMA
    if id_column != "video_id":
        schema = schema.set(0, pa.field(id_column, pa.string()))
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def list_names(folder_uri: str, storage_options: dict | None = None, suffix: str = ".parquet") -> set[str]:
    """Names (without ``suffix``) of the complete files in an output folder (temporary files skipped)."""
    fs, path = url_to_fs(folder_uri, storage_options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return set()
    names = (os.path.basename(p) for p in fs.ls(path, detail=False))
    return {n[: len(n) - len(suffix)] for n in names if n.endswith(suffix) and not n.startswith(".")}


def read_part(uri: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table | None:
    """One Parquet part, or None when it does not exist."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError:
        return None


def remove(uri: str, storage_options: dict | None = None, recursive: bool = False) -> None:
    """Delete ``uri`` (with ``recursive``, a folder and all under it) if it exists."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def read_folder(folder_uri: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    """All complete parts of an output folder as one table (temporary files are skipped)."""
    fs, path = url_to_fs(folder_uri, storage_options)
    fs.invalidate_cache()
    files = sorted(p for p in fs.ls(path, detail=False)
                   if p.endswith(".parquet") and not os.path.basename(p).startswith("."))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        raise FileNotFoundError(f"no Parquet parts in {folder_uri}")
    return pa.concat_tables(tables, promote_options="default")
