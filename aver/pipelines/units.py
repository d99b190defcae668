"""Units of work shared by the batch jobs (extract_faces, distill, score_videos): planning what is
left to do, committing a unit's outputs exactly once, and running units through Ray Data actors.

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
"""

from __future__ import annotations

import hashlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from aver.faults import RETRIED, RetryPolicy, verdict, with_retries
from aver.io.parts import join, list_names, read_part, remove, status_table, write_table
from aver.io.storage import redact, register_secrets, split_credentials, write_bytes_atomic

log = logging.getLogger("aver")


@dataclass(kw_only=True)
class ActorPoolConfig:
    """The actor pool of a Ray Data job (extract_faces, distill, score_videos) and its storage."""

    actors: int = 0
    """Actors; 0 picks one per GPU share, or CPUs - 1 (at least 1) without GPUs."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (decoding runs inside it, in a prefetch thread)."""
    gpus_per_actor: float = 0.0
    """GPU share per actor (e.g. 0.25 puts four actors on one GPU); 0 runs on CPU. On CUDA the
    models run in bf16 autocast, channels_last."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for inputs, models and output (e.g. an S3 endpoint, credentials)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of transient storage/network faults, per input and per output write."""

    uri_fields: ClassVar[tuple[str, ...]] = ()
    """The job's URI fields: credentials in them (``s3://KEY:SECRET@bucket``) move to ``storage_options``."""

    def __post_init__(self) -> None:
        if self.actors < 0 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("actors >= 0, cpus_per_actor > 0, gpus_per_actor >= 0")
        if isinstance(self.retry, dict):
            self.retry = RetryPolicy(**self.retry)
        for name in self.uri_fields:
            uri, self.storage_options = split_credentials(getattr(self, name), self.storage_options)
            setattr(self, name, uri)
        register_secrets(self.storage_options)


def chunk_id(prefix: str, ids: list[str]) -> str:
    """The name of a chunk: its prefix and a hash of its members (never their positions)."""
    return f"{prefix}-{hashlib.sha1(chr(10).join(sorted(ids)).encode()).hexdigest()[:16]}"


@dataclass
class Plan:
    """What a run does: the units to process and how many were already complete."""

    units: list[dict]
    """``{"unit_id", "items": [...], "retry": bool}`` to process now."""
    n_complete: int
    """Units already complete (skipped)."""


def plan(output: str, storage_options: dict | None, *, singles: list[tuple[str, dict]],
         chunked: list[tuple[str, dict]] = (), prefix: str = "images", per_unit: int = 1024,
         id_column: str = "video_id", output_folders: tuple[str, ...] = ()) -> Plan:
    """The units still to process in ``output``.

    ``singles`` are ``(unit_id, item)`` units of one item each (a video); ``chunked`` are
    ``(item_id, item)`` pairs grouped into chunks named ``<prefix>-<hash>`` (images, crops)."""
    so = storage_options
    done = list_names(join(output, "status"), so)
    retry = list_names(join(output, "_retry"), so, suffix="")
    units = [{"unit_id": uid, "items": [item], "retry": uid in retry} for uid, item in singles
             if uid not in done or uid in retry]
    n_complete = sum(1 for uid, _ in singles if uid in done and uid not in retry)
    if chunked:
        by_id = dict(chunked)
        single_ids = {uid for uid, _ in singles}  # a video named "images-..." is no chunk
        ledger = _read_ledger(output, so, sorted(u for u in done if u.startswith(prefix + "-") and u not in single_ids),
                              id_column)
        seen: set[str] = set()
        for uid, rows in ledger.items():
            seen.update(rows)
            redo = [by_id[i] for i, st in rows.items() if st in RETRIED and i in by_id]
            if redo:  # its ledger says some items failed: the rerun does them (the marker says so too)
                units.append({"unit_id": uid, "items": redo, "retry": True})
            else:
                n_complete += 1
        new = sorted(i for i in by_id if i not in seen)
        for start in range(0, len(new), per_unit):
            ids = new[start:start + per_unit]
            units.append({"unit_id": chunk_id(prefix, ids), "items": [by_id[i] for i in ids], "retry": False})
        # Parts of chunks whose status never landed (a killed run) would duplicate rows: drop them.
        planned = {u["unit_id"] for u in units}
        for folder in output_folders:
            for name in list_names(join(output, folder), so):
                if name.startswith(prefix + "-") and name not in done | planned | single_ids:
                    remove(join(output, folder, f"{name}.parquet"), so)
    return Plan(units, n_complete)


def _read_ledger(output: str, so, names: list[str], id_column: str) -> dict[str, dict[str, str]]:
    """``{unit: {item id: status}}`` of chunk status parts, read in parallel (one GET each)."""

    def read(name: str) -> dict[str, str]:
        table = read_part(join(output, "status", f"{name}.parquet"), so, columns=[id_column, "status"])
        return dict(zip(table[id_column].to_pylist(), table["status"].to_pylist())) if table is not None else {}

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(names, pool.map(read, names)))


def guarded(fn: Callable[[], Any], policy: RetryPolicy, what: str) -> tuple[Any, tuple[str, str] | None]:
    """``(fn(), None)``, or ``(None, (status, error))`` for whatever it raised once transient
    faults were retried: one input's failure never reaches its neighbours."""
    try:
        return with_retries(fn, policy, what), None
    except Exception as e:  # noqa: BLE001 - every failure of one input becomes its status row
        return None, verdict(e, what)


def commit(output: str, unit: dict, parts: dict[str, tuple[pa.Table, str]], statuses: list[dict], *,
           id_column: str, storage_options: dict | None, policy: RetryPolicy,
           files: dict[str, bytes] | None = None) -> None:
    """Write a unit: its ``parts`` (``folder -> (table, column holding the item id)``) and extra
    ``files`` (``path under output -> bytes``), then its status rows. A retried unit keeps the
    rows of items it did not redo. Each write is atomic and retried; the status part goes last."""
    so, uid = storage_options, unit["unit_id"]
    write = lambda uri, table: with_retries(lambda: write_table(uri, table, so), policy, uri)  # noqa: E731
    status = status_table(statuses, id_column)
    if unit.get("retry"):
        redone = pa.array([s[id_column] for s in statuses], pa.string())
        old = read_part(join(output, "status", f"{uid}.parquet"), so)
        if old is not None:
            status = pa.concat_tables([old.filter(pc.invert(pc.is_in(old[id_column], redone))).cast(status.schema),
                                       status])
        merged = {}
        for folder, (table, key) in parts.items():
            old = read_part(join(output, folder, f"{uid}.parquet"), so)
            if old is not None:
                table = pa.concat_tables([old.filter(pc.invert(pc.is_in(old[key], redone))).cast(table.schema),
                                          table])
            merged[folder] = (table, key)
        parts = merged
    failed = any(st in RETRIED for st in status["status"].to_pylist())
    marker = join(output, "_retry", uid)
    if failed:
        with_retries(lambda: write_bytes_atomic(marker, b"", so), policy, marker)
    for folder, (table, _) in parts.items():
        write(join(output, folder, f"{uid}.parquet"), table)
    for path, data in (files or {}).items():
        uri = join(output, path)
        with_retries(lambda: write_bytes_atomic(uri, data, so), policy, uri)
    write(join(output, "status", f"{uid}.parquet"), status)
    if unit.get("retry") and not failed:
        with_retries(lambda: remove(marker, so), policy, marker)


def run_units(units: Iterator[dict], process: Callable[[dict], dict], id_column: str) -> dict[str, list]:
    """Actor body: ``process(unit)`` for each unit (it commits and returns its status rows); a
    unit whose bookkeeping itself fails is reported as not recorded, and the actor goes on."""
    out: dict[str, list] = {"unit_id": [], "item_id": [], "status": [], "error": []}
    for unit in units:
        try:
            rows = process(unit)
        except Exception as e:  # noqa: BLE001 - e.g. the output store is down: nothing recorded
            status, error = verdict(e, f"unit {unit['unit_id']}")
            rows = [{id_column: item.get("item_id", unit["unit_id"]), "status": "unrecorded",
                     "error": f"{status}: {error}"} for item in unit["items"]]
        for r in rows:
            out["unit_id"].append(unit["unit_id"])
            out["item_id"].append(r[id_column])
            out["status"].append(r["status"])
            out["error"].append(r.get("error") or "")
    return out


def batch_units(batch: dict) -> Iterator[dict]:
    """The units of a Ray Data batch as dicts (``items`` as plain dicts)."""
    for i in range(len(batch["unit_id"])):
        yield {"unit_id": batch["unit_id"][i], "retry": bool(batch["retry"][i]),
               "items": [dict(x) for x in batch["items"][i]]}


def actor_count(actors: int, cpus_per_actor: float, gpus_per_actor: float, n_units: int) -> int:
    """Actors to start: as asked, else one per GPU share, else CPUs - 1; never more than units."""
    import ray

    if actors:
        return max(1, min(actors, n_units))
    res = ray.cluster_resources()
    if gpus_per_actor > 0 and res.get("GPU", 0) > 0:
        n = int(res["GPU"] / gpus_per_actor)
    else:
        n = int(res.get("CPU", 1) / cpus_per_actor) - 1  # leave room for Ray Data's own tasks
    return max(1, min(n, n_units))


def actor_setup(cfg: ActorPoolConfig, who: str):
    """What every job actor does first: learn the secrets to redact (a config unpickled in the
    actor has not run ``__post_init__``), size torch's threads, pick its device."""
    register_secrets(cfg.storage_options)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    import torch

    # Threads = the CPU reservation, rounded: Ray sets OMP_NUM_THREADS=1 for fractional or 1-CPU
    # actors, and an actor holding 2 CPUs should use both.
    torch.set_num_threads(max(1, int(round(cfg.cpus_per_actor))))
    return actor_device(cfg.gpus_per_actor, who)


def actor_device(gpus_per_actor: float, who: str):
    """The torch device of an actor that asked Ray for ``gpus_per_actor``: CUDA when it works, else
    the CPU, said in the log (a node may declare a GPU resource that CUDA cannot reach)."""
    import ray
    import torch

    if gpus_per_actor <= 0:
        return torch.device("cpu")
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if torch.cuda.is_available():
        print(f"{who}: on CUDA (Ray GPU ids {ids})", flush=True)
        return torch.device("cuda")
    print(f"{who}: Ray GPU ids {ids} but CUDA is not available: falling back to CPU", flush=True)
    return torch.device("cpu")


def map_units(units: list[dict], actor_cls: type, cfg: ActorPoolConfig) -> Iterator:
    """Stream ``units`` through ``actor_cls(cfg)`` actors, as many as ``cfg`` asks; yields the
    actors' result batches (pandas). Starts a local Ray if none is running (under ``ray job
    submit`` this connects to the cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    remote_args = {"num_cpus": cfg.cpus_per_actor}
    if cfg.gpus_per_actor > 0:
        remote_args["num_gpus"] = cfg.gpus_per_actor
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(actor_cls, fn_constructor_kwargs={"cfg": cfg}, batch_size=1,
                        concurrency=actor_count(cfg.actors, cfg.cpus_per_actor, cfg.gpus_per_actor, len(units)),
                        **remote_args)
    yield from ds.iter_batches(batch_size=None, batch_format="pandas")


def summarise(job: str, batches: Iterator, verbose_statuses: tuple[str, ...] = ("ok",)) -> dict[str, int]:
    """Drain the actors' result batches: print each input that is not ``ok`` and a closing count
    per status; returns the counts (``unrecorded``: units whose outputs could not be written)."""
    counts: dict[str, int] = {}
    for batch in batches:
        for item, status, error in zip(batch["item_id"], batch["status"], batch["error"]):
            counts[status] = counts.get(status, 0) + 1
            if status not in verbose_statuses:
                print(f"  {item}: {status}{' - ' + redact(error) if error else ''}", flush=True)
    print(f"{job}: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing to do"), flush=True)
    if counts.get("failed") or counts.get("unrecorded"):
        print(f"{job}: {counts.get('failed', 0) + counts.get('unrecorded', 0)} inputs hit transient faults that "
              "outlived the retries: run the same command again to finish them", flush=True)
    return counts
