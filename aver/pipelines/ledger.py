"""The ledger of a batch job's output: which units are still to do, their names, committing a
unit's outputs exactly once, and the staging area where a unit's segments wait for its commit.

A unit is one video (or one faces/ part) or a chunk of items (images, crops). Its outputs are
``<folder>/<unit>.parquet`` for each output folder and then ``status/<unit>.parquet``, one row
per item; the status part, written last, is the unit's completion mark and the ledger of its items.

- **Unit ids never depend on positions.** A video's unit is its item id. Chunks are formed only
  from items that no status part holds yet, and named by a hash of their members, so adding
  inputs never renames or redoes anything else: a rerun after adding one image processes that
  image alone. A chunk output without its status part (a run killed between the two) is deleted
  when the next run plans.
- **Transient failures are redone.** A unit with ``failed`` items gets a marker
  ``_retry/<unit>`` before its parts are written; a rerun processes its failed items again,
  merges them with the unit's final rows, rewrites the unit's parts under the same names and
  removes the marker. No id ever appears twice.
- **Long inputs are clips.** A video longer than the job's ``clip_s`` is planned as clip units
  (time ranges; with score_videos its audio one more), named ``<input>.<clip>`` where the clip's name
  holds a hash of ``clip_s`` and ``fps``. A clip's segments are kept in ``_clips/<input>/<clip>/``
  and its commit is the marker ``_clips/<input>/<clip>.done``; once every clip of an input is
  committed, one task commits the input from them (its parts, status last) and removes
  ``_clips/<input>/``. A rerun plans only the clips without a marker; clips of other settings,
  and those of inputs complete since, are removed when it plans.
- **Staging is scratch.** The segments of a unit cut into several records (a long video, a large
  faces part) wait in ``_staging/<unit>/`` until the unit commits, which removes them; whatever a
  killed run left there is removed when the next run plans, before anything is staged again.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aver.faults import RETRIED, RetryPolicy, with_retries
from aver.io.parts import join, list_names, read_part, remove, status_table, write_table, write_tables
from aver.io.media import ClipRange
from aver.io.storage import write_bytes_atomic

STAGING = "_staging"
"""Folder under a job's output where segments wait for their unit's commit."""
CLIPS = "_clips"
"""Folder under a job's output where the clips of long inputs wait for the input's commit."""


@dataclass
class Unit:
    """One unit of work: what a run processes and commits as a whole."""

    unit_id: str
    """Its name: a video's (or faces part's) id, or ``<prefix>-<hash of the members>`` for a chunk."""
    items: list[dict]
    """The inputs it covers (an item's fields, or a manifest entry)."""
    retry: bool = False
    """It was committed before with ``failed`` items: only those are redone, then merged."""
    clip: "Clip | None" = None
    """The time range of a long input it is, if it is one."""


@dataclass
class Clip:
    """A clip of a long input: what of the input a clip unit reads, and where it stands among the
    input's clips."""

    input: Unit
    """The input's own unit (its finalize commits it)."""
    name: str
    """``c<hash of clip_s and fps>-<index>``, or ``...-audio`` for the audio of the whole input."""
    names: list[str]
    """All the input's clips, in the order its finalize reads them (video clips, then the audio)."""
    ranges: list[ClipRange | None]
    """Their time ranges (None: the audio of the whole input)."""

    @property
    def index(self) -> int:
        return self.names.index(self.name)

    @property
    def range(self) -> ClipRange | None:
        """This clip's time range; None for the audio clip."""
        return self.ranges[self.index]


@dataclass
class Plan:
    """What a run does: the units to process and how many were already complete."""

    units: list[Unit]
    """The units to process now."""
    n_complete: int
    """Units already complete (skipped)."""


def status_row(id_column: str, item_id: str, source: str | None, status: str = "ok", error: str | None = None,
               n_frames: int = 0, duration_s: float | None = None) -> dict[str, Any]:
    """One input's status row, as every job writes it (``id_column``: ``video_id`` or ``item_id``)."""
    return {id_column: item_id, "source": source, "status": status, "error": error, "n_frames": n_frames,
            "duration_s": duration_s}


def chunk_id(prefix: str, ids: list[str]) -> str:
    """The name of a chunk: its prefix and a hash of its members (never their positions)."""
    return f"{prefix}-{hashlib.sha1(chr(10).join(sorted(ids)).encode()).hexdigest()[:16]}"


def plan(output: str, storage_options: dict | None, *, singles: list[tuple[str, dict]],
         chunked: dict[str, list[tuple[str, dict]]] | None = None, per_unit: int = 1024,
         id_column: str = "video_id", output_folders: tuple[str, ...] = ()) -> Plan:
    """The units still to process in ``output``.

    ``singles`` are ``(unit_id, item)`` units of one item each (a video); ``chunked`` maps a prefix
    to ``(item_id, item)`` pairs grouped into chunks named ``<prefix>-<hash>`` (images, crops; each
    prefix its own ledger). What a killed run left in the staging area is removed."""
    so = storage_options
    remove(join(output, STAGING), so, recursive=True)
    done = list_names(join(output, "status"), so)
    retry = list_names(join(output, "_retry"), so, suffix="")
    units = [Unit(uid, [item], uid in retry) for uid, item in singles if uid not in done or uid in retry]
    n_complete = sum(1 for uid, _ in singles if uid in done and uid not in retry)
    single_ids = {uid for uid, _ in singles}  # a video named "images-..." is no chunk
    chunked = {prefix: pairs for prefix, pairs in (chunked or {}).items() if pairs}
    for prefix, pairs in chunked.items():
        by_id = dict(pairs)
        ledger = _read_ledger(output, so, sorted(u for u in done if u.startswith(prefix + "-") and u not in single_ids),
                              id_column)
        seen: set[str] = set()
        for uid, rows in ledger.items():
            seen.update(rows)
            redo = [by_id[i] for i, st in rows.items() if st in RETRIED and i in by_id]
            if redo:  # its ledger says some items failed: the rerun does them (the marker says so too)
                units.append(Unit(uid, redo, True))
            else:
                n_complete += 1
        new = sorted(i for i in by_id if i not in seen)
        for start in range(0, len(new), per_unit):
            ids = new[start:start + per_unit]
            units.append(Unit(chunk_id(prefix, ids), [by_id[i] for i in ids]))
    # Parts of chunks whose status never landed (a killed run) would duplicate rows: drop them.
    prefixes = tuple(f"{prefix}-" for prefix in chunked)
    if prefixes:
        keep = done | {u.unit_id for u in units} | single_ids
        for folder in output_folders:
            for name in list_names(join(output, folder), so):
                if name.startswith(prefixes) and name not in keep:
                    remove(join(output, folder, f"{name}.parquet"), so)
    return Plan(units, n_complete)


def _read_ledger(output: str, so, names: list[str], id_column: str) -> dict[str, dict[str, str]]:
    """``{unit: {item id: status}}`` of chunk status parts, read in parallel (one GET each)."""

    def read(name: str) -> dict[str, str]:
        table = read_part(join(output, "status", f"{name}.parquet"), so, columns=[id_column, "status"])
        return dict(zip(table[id_column].to_pylist(), table["status"].to_pylist())) if table is not None else {}

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(names, pool.map(read, names)))


def clip_names(clip_s: float, fps: float, n_video: int, audio: bool) -> list[str]:
    """The clips of an input cut into ``n_video`` video clips (and its audio as one more)."""
    key = "c" + hashlib.sha1(f"{clip_s!r}|{fps!r}".encode()).hexdigest()[:8]
    return [f"{key}-{k:04d}" for k in range(n_video)] + ([f"{key}-audio"] if audio else [])


def plan_clips(output: str, storage_options: dict | None, units: list[Unit], probes: dict[str, tuple[float, float]],
               *, clip_s: float, fps: float, audio: bool, max_duration_s: float) -> tuple[list[Unit], list[Clip]]:
    """Cut the units of inputs that ``probes`` names (``unit id -> (duration, first frame time)``)
    into clip units of ``clip_s`` (whole sampling slots at ``fps``; the last one open-ended, none past
    ``max_duration_s``), leaving out the clips committed before. Returns the units to run, and one
    clip of each input whose clips were all committed before (only its finalize is left to do).
    Clips of other settings, and those of inputs no longer pending, are removed."""
    so = storage_options
    slots = max(1, round(clip_s * fps))
    pending = {u.unit_id for u in units}
    for name in list_names(join(output, CLIPS), so, suffix=""):
        if name not in pending:
            remove(join(output, CLIPS, name), so, recursive=True)
    todo, finalize_only = [], []
    for unit in units:
        if unit.unit_id not in probes:
            todo.append(unit)
            continue
        duration, origin = probes[unit.unit_id]
        n_video = max(1, int(np.ceil(min(duration, max_duration_s) * fps / slots - 1e-9)))
        names = clip_names(clip_s, fps, n_video, audio)
        folder = join(output, CLIPS, unit.unit_id)
        done = list_names(folder, so, suffix=".done")
        for stale in list_names(folder, so, suffix="") - set(names) - {f"{n}.done" for n in names}:
            remove(join(folder, stale), so, recursive=True)
        ranges = [ClipRange(k * slots / fps, (k + 1) * slots / fps if k + 1 < n_video else None, origin)
                  if k < n_video else None for k in range(len(names))]
        clips = [Clip(unit, name, names, ranges) for name in names]
        left = [c for c in clips if c.name not in done]
        todo += [Unit(f"{unit.unit_id}.{c.name}", unit.items, unit.retry, c) for c in left]
        if not left:
            finalize_only.append(clips[-1])
    return todo, finalize_only


Part = tuple[pa.Table | Callable[[], Iterable[pa.Table]], pa.Schema, str]
"""An output part: a table, or a function giving tables to write one after the other (called
again if a write is retried); its schema; the item id column."""


def commit(output: str, unit: Unit, parts: dict[str, Part], statuses: list[dict], *, id_column: str,
           storage_options: dict | None, policy: RetryPolicy, files: dict[str, bytes] | None = None) -> None:
    """Write a unit: its ``parts`` (``folder -> part``) and extra ``files`` (``path under output ->
    bytes``), then its status rows. A retried unit keeps the rows of items it did not redo. Each
    write is atomic and retried; the status part goes last."""
    so, uid = storage_options, unit.unit_id
    status = status_table(statuses, id_column)
    redone = pa.array([s[id_column] for s in statuses], pa.string())
    if unit.retry:
        old = read_part(join(output, "status", f"{uid}.parquet"), so)
        if old is not None:
            status = pa.concat_tables([old.filter(pc.invert(pc.is_in(old[id_column], redone))).cast(status.schema),
                                       status])
    failed = any(st in RETRIED for st in status["status"].to_pylist())
    marker = join(output, "_retry", uid)
    if failed:
        with_retries(lambda: write_bytes_atomic(marker, b"", so), policy, marker)
    for folder, (tables, schema, key) in parts.items():
        uri = join(output, folder, f"{uid}.parquet")
        kept = None
        if unit.retry:
            old = read_part(uri, so)
            kept = old.filter(pc.invert(pc.is_in(old[key], redone))).cast(schema) if old is not None else None
        if isinstance(tables, pa.Table):
            table = pa.concat_tables([kept, tables.cast(schema)]) if kept is not None else tables
            with_retries(lambda: write_table(uri, table, so), policy, uri)
        else:
            with_retries(lambda: write_tables(uri, schema, _chain(kept, tables()), so), policy, uri)
    for path, data in (files or {}).items():
        uri = join(output, path)
        with_retries(lambda: write_bytes_atomic(uri, data, so), policy, uri)
    status_uri = join(output, "status", f"{uid}.parquet")
    with_retries(lambda: write_table(status_uri, status, so), policy, status_uri)
    if unit.retry and not failed:
        with_retries(lambda: remove(marker, so), policy, marker)


def _chain(first: pa.Table | None, rest: Iterable[pa.Table]) -> Iterable[pa.Table]:
    if first is not None:
        yield first
    yield from rest
