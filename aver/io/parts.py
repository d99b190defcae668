"""Output folders shared by the jobs: Parquet parts written atomically, one per unit of work,
with the unit's ``status/`` part written last so that its presence means "complete"."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from aver.faults import MediaError, RetryPolicy, describe, is_transient
from aver.io.storage import is_local, redact, url_to_fs, write_bytes_atomic

log = logging.getLogger("aver")

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


def find_parts(source: str, storage_options: dict | None = None,
               folder: str = "faces") -> tuple[list[tuple[str, str]], list[str] | None]:
    """The parts of a job's output ``source`` (its ``folder/`` parts, or parts right in it) as
    ``(name, uri)``, and the recursive listing they came from (None when ``source`` is no folder),
    which a caller that finds no parts may read as a folder of inputs: one listing either way."""
    fs, path = url_to_fs(source, storage_options)
    fs.invalidate_cache()
    if not fs.isdir(path):
        return [], None
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    root = path.rstrip("/")
    files = fs.find(root)
    found = {d: sorted(p for p in files if os.path.dirname(p) == d and p.endswith(".parquet")
                       and not os.path.basename(p).startswith(".")) for d in (join(root, folder), root)}
    parts = found[join(root, folder)] or found[root]
    return [(os.path.basename(p)[: -len(".parquet")], protocol + p) for p in parts], files


def read_slices(uri: str, columns: list[str], rows: int, storage_options: dict | None = None,
                policy: RetryPolicy | None = None) -> Iterator[pa.Table]:
    """A part's ``columns``, ``rows`` at a time, from one open file: row group by row group, pages as
    they are needed (a part is never read whole; one written as one row group is). A transient
    storage fault re-opens the part where it stopped (at most ``policy.attempts`` tries in all); a
    file that is no Parquet part raises :class:`MediaError` ("corrupt")."""
    policy = policy or RetryPolicy()
    done, attempt = 0, 0
    while True:
        try:
            for table in _slices_from(uri, columns, rows, storage_options, done):
                done += table.num_rows
                yield table
            return
        except Exception as e:  # noqa: BLE001 - only transient faults are retried
            if not is_transient(e) or attempt == policy.attempts - 1:
                if isinstance(e, (pa.ArrowInvalid, OSError)) and not is_transient(e):
                    raise MediaError("corrupt", f"{redact(uri)} is not a readable part: {describe(e)}") from None
                raise
            log.warning("%s: %s at row %d; try %d of %d", redact(uri), describe(e), done, attempt + 2, policy.attempts)
            time.sleep(policy.delay(attempt))
            attempt += 1


def _slices_from(uri: str, columns: list[str], rows: int, storage_options, start: int) -> Iterator[pa.Table]:
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        part = pq.ParquetFile(f, buffer_size=1 << 20)
        groups, skip = [], start  # the row groups from the one holding row ``start``
        for g in range(part.num_row_groups):
            n = part.metadata.row_group(g).num_rows
            if skip >= n and not groups:
                skip -= n
            else:
                groups.append(g)
        if not groups:
            return
        for batch in part.iter_batches(batch_size=rows, columns=columns, row_groups=groups):
            table = pa.Table.from_batches([batch])
            if skip:
                table, skip = table.slice(min(skip, table.num_rows)), max(0, skip - table.num_rows)
                if not table.num_rows:
                    continue
            yield table
