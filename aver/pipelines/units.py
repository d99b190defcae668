"""Units of work shared by the batch jobs (extract_faces, distill, score_videos): planning what is
left to do, committing a unit's outputs exactly once, and running units through Ray Data stages.

A job is three stages, Ray Data's batch-inference shape (:func:`run_stages`):

1. **load** (CPU tasks, any node): read the unit's inputs (many requests in flight), decode,
   crop, resize; a unit becomes a *record* holding arrays ready for the model, or for a video a
   record per segment of sampled frames and a last one.
2. **model** (:class:`ModelStage`, an autoscaling actor pool, GPU when asked): several records
   per call, their arrays gathered into large batches; the models and nothing else.
3. **write** (a Ray task per unit, any node, started by the driver once all the unit's records are
   through the models): what needs the whole unit, then its parts, status last; returns its status rows.

A record is a plain dict pickled into one ``record`` column: units differ in what they hold
(variable crop counts, status rows with nulls) and Arrow's type inference would turn tuples into
arrays and nulls into errors; one binary column crosses the object store untouched.

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
import os
import pickle
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from aver.faults import RETRIED, RetryPolicy, verdict, with_retries
from aver.console import init_ray
from aver.io.parts import join, list_names, read_part, remove, status_table, write_table
from aver.io.storage import is_local, redact, register_secrets, split_credentials, write_bytes_atomic
from aver.io.streaming import actor_device, trim_heap

log = logging.getLogger("aver")


@dataclass(kw_only=True)
class ActorPoolConfig:
    """The actor pool of a Ray Data job (extract_faces, distill, score_videos) and its storage."""

    actors: int = 0
    """Most model actors; 0: no cap (the pool grows while the cluster has room, e.g. as GPU nodes join)."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per model actor (it only runs the models: reading and decoding are CPU tasks)."""
    gpus_per_actor: float = 0.0
    """GPU share per model actor (e.g. 0.25 puts four actors on one GPU); 0 runs on CPU. On CUDA the
    models run in bf16 autocast, channels_last."""
    cpus_per_task: float = 1.0
    """CPUs per load/write task (read, decode, crop; commit), which run on any node's CPUs."""
    io_threads: int = 16
    """Reads in flight per load task (remote storage is latency-bound)."""
    write_tasks: int = 0
    """Write tasks in flight at once; 0: a quarter of the cluster's task slots (CPUs / cpus_per_task),
    at least 2. Units beyond it wait in the driver (model outputs, small): a backlog of writes queued in
    Ray makes it start a worker process (hundreds of MB, seconds of imports) for each."""
    read_ahead: float = 0.25
    """Share of the cluster's object store that records waiting between stages may fill (Ray Data's
    budget for the job; its own default is 0.5): decoded frames queue ahead of the models as far as
    keeps them fed, and no further, so memory stops growing with the corpus."""
    records_per_call: int = 4
    """Records one model-actor call takes (a unit, or a segment of a video): their crops or frames
    are batched together, so model batches are not cut at unit boundaries."""
    shared_fs: bool = False
    """Local paths are on a filesystem every node mounts (NFS, Lustre): allow them on a multi-node cluster."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for inputs, models and output (e.g. an S3 endpoint, credentials)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of transient storage/network faults, per input and per output write."""

    uri_fields: ClassVar[tuple[str, ...]] = ()
    """The job's URI fields: credentials in them (``s3://KEY:SECRET@bucket``) move to ``storage_options``."""

    def storage_uris(self) -> list[tuple[str, str]]:
        """``(field, URI)`` of everything the job's tasks and actors read or write."""
        return [(name, getattr(self, name)) for name in self.uri_fields]

    def __post_init__(self) -> None:
        if self.actors < 0 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0 or self.cpus_per_task <= 0:
            raise ValueError("actors >= 0, cpus_per_actor > 0, gpus_per_actor >= 0, cpus_per_task > 0")
        if self.io_threads < 1 or self.records_per_call < 1 or self.write_tasks < 0:
            raise ValueError("io_threads >= 1, records_per_call >= 1 and write_tasks >= 0")
        if not 0 < self.read_ahead <= 1:
            raise ValueError("read_ahead must be in (0, 1]")
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


def guarded_map(fn: Callable[[Any], Any], items: list, cfg: ActorPoolConfig,
                source: Callable[[Any], str]) -> list[tuple[Any, tuple[str, str] | None]]:
    """:func:`guarded` ``fn(item)`` for every item, ``cfg.io_threads`` at a time (reads from remote
    storage are latency-bound), in the items' order."""
    if not items:
        return []
    with ThreadPoolExecutor(min(cfg.io_threads, len(items))) as pool:
        return list(pool.map(lambda item: guarded(lambda: fn(item), cfg.retry, source(item)), items))


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


def _unrecorded(unit: dict, error: tuple[str, str], id_column: str) -> list[dict]:
    status, text = error
    return [{id_column: item.get("item_id", unit["unit_id"]), "status": "unrecorded", "error": f"{status}: {text}"}
            for item in unit["items"]]


def _load_stage(batch: dict, load: Callable, cfg: ActorPoolConfig) -> Iterator[dict]:
    """CPU task: ``load(unit, cfg)`` for each unit, a record or an iterator of records (a video's
    segments), each handed on as soon as it is made; whatever it raises ends the unit with a
    record holding its ``failure``."""
    register_secrets(cfg.storage_options)
    for blob in batch["record"]:
        unit = pickle.loads(blob)["unit"]
        segment, held = 0, None
        try:
            made = load(unit, cfg)
            for record in ([made] if isinstance(made, dict) else made):
                if held is not None:
                    yield _row(unit, segment, False, held)
                    segment += 1
                held = record
        except Exception as e:  # noqa: BLE001 - the write task turns it into the unit's status rows
            if held is not None:
                yield _row(unit, segment, False, held)
                segment += 1
            held = {"unit": unit, "failure": verdict(e, f"unit {unit['unit_id']}")}
        yield _row(unit, segment, True, held)
        trim_heap()


def _row(unit: dict, segment: int, last: bool, record: dict) -> dict:
    return {"unit_id": [unit["unit_id"]], "segment": [segment], "last": [last],
            "record": [pickle.dumps(record, protocol=5)]}


class ModelStage:
    """Base of a job's model stage, a Ray Data actor: ``__init__(cfg)`` loads the models once and
    :meth:`run` fills in what they compute for several records at a time (units, or segments of
    videos), gathered into large batches. A record whose content breaks a shared batch is found by
    running each alone; it gets its ``failure``, the others their results. The record keys in
    ``consumed`` (the model inputs) are dropped before the records go on to the write task."""

    consumed: ClassVar[tuple[str, ...]] = ("images",)

    def run(self, records: list[dict]) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        records = [pickle.loads(b) for b in batch["record"]]
        todo = [r for r in records if "failure" not in r]
        try:
            if todo:
                self.run(todo)
        except Exception:  # noqa: BLE001 - isolate the record that broke the batch
            for r in todo:
                try:
                    self.run([r])
                except Exception as e:  # noqa: BLE001
                    r["failure"] = verdict(e, f"unit {r['unit']['unit_id']}")
        for r in records:
            for key in self.consumed:
                r.pop(key, None)
        out = {**batch, "record": [pickle.dumps(r, protocol=5) for r in records]}
        del records, todo
        trim_heap()
        return out


def _write_task(write: Callable, cfg: ActorPoolConfig, id_column: str, blobs: list[bytes]) -> dict:
    """Ray task: ``write(records, cfg)`` commits a unit from its records (in order) and returns its
    status rows; a unit whose commit itself fails (e.g. the output store is down) is reported as
    not recorded."""
    register_secrets(cfg.storage_options)
    records = [pickle.loads(b) for b in blobs]
    unit = records[0]["unit"]
    try:
        rows = write(records, cfg)
    except Exception as e:  # noqa: BLE001 - nothing recorded: the rerun does the unit again
        rows = _unrecorded(unit, verdict(e, f"unit {unit['unit_id']}"), id_column)
    del records
    trim_heap()
    return {"item_id": [r[id_column] for r in rows], "status": [r["status"] for r in rows],
            "error": [r.get("error") or "" for r in rows]}


def model_pool(cfg: ActorPoolConfig, n_units: int):
    """The model stage's actor pool: from one actor up to ``--actors`` (no cap when 0), never more
    than the units. It grows while the cluster has room for one more actor's CPU and GPU share,
    e.g. as the autoscaler adds GPU nodes; it is never sized from a count of CPUs."""
    from ray.data import ActorPoolStrategy

    most = min(cfg.actors, n_units) if cfg.actors else max(1, n_units)
    return ActorPoolStrategy(min_size=1, max_size=most)


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


def keep_task_workers() -> None:
    """Before ``ray.init()`` starts a local Ray: let it keep more idle worker processes than its
    default (its CPU count, model actors included). On a few-CPU machine that default kills a load
    or write task's worker as soon as it idles a second, and the next task pays a new process and
    its imports (torch, PyAV: seconds of CPU taken from the models). No effect on a running cluster."""
    os.environ.setdefault("RAY_num_workers_soft_limit", str(max(4, 2 * (os.cpu_count() or 1))))


def connect(cfg: ActorPoolConfig) -> None:
    """Join the Ray cluster (``ray.init()``: under ``ray job submit`` the job's cluster, else a new
    local one; a job calls it once it has planned work, so a rerun with nothing to do starts no Ray)
    and refuse node-local paths on a multi-node cluster: each node would read its own
    disk and write outputs there, where no rerun finds them. ``--shared-fs`` says the paths are
    mounted everywhere."""
    import ray

    if not ray.is_initialized():
        keep_task_workers()
        init_ray()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes < 2 or cfg.shared_fs:
        return
    local = [(name, uri) for name, uri in cfg.storage_uris() if uri and is_local(str(uri).rsplit("::", 1)[-1])]
    if local:
        named = ", ".join(f"--{name.replace('_', '-')} {redact(str(uri))}" for name, uri in local)
        raise ValueError(f"{named}: local path{'s' if len(local) > 1 else ''} on a Ray cluster of {nodes} nodes; "
                         "tasks and actors run on any node, and each would see its own disk (outputs scattered, "
                         "reruns blind to them). Use a store every node reaches (s3://, gs://, ...), or pass "
                         "--shared-fs if these paths are on a filesystem every node mounts.")


def run_stages(units: list[dict], cfg: ActorPoolConfig, *, load: Callable[[dict, Any], dict | Iterator[dict]],
               model: type[ModelStage], write: Callable[[list[dict], Any], list[dict]], id_column: str,
               records_per_call: int = 1) -> Iterator[dict]:
    """Stream ``units`` through load tasks -> ``model`` actors (``records_per_call`` records per
    call) -> one write task per unit; yields each unit's status rows as it completes.

    The write task of a unit starts when all its records are through the models: this driver
    gathers them (small: model outputs, never frames) as they stream out of Ray Data, so a video
    cut into segments is committed whole, in order, with no barrier over the dataset. Runs on
    the cluster the job's :func:`connect` joined once it had planned work to do."""
    import ray

    cpu = {"num_cpus": cfg.cpus_per_task}
    # max_restarts: a model actor lost with its node comes back wherever a GPU share is free; it also
    # keeps Ray Data from fusing the load tasks into the actors when both ask for the same CPUs.
    gpu = {"num_cpus": cfg.cpus_per_actor, "max_restarts": -1,
           **({"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor > 0 else {})}
    rows = [{"unit_id": u["unit_id"], "record": pickle.dumps({"unit": u}, protocol=5)} for u in units]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds.context.override_object_store_memory_limit_fraction = cfg.read_ahead  # the stages below copy it
    ds = ds.map_batches(_load_stage, fn_kwargs={"load": load, "cfg": cfg}, batch_size=1, **cpu)
    ds = ds.map_batches(model, fn_constructor_kwargs={"cfg": cfg}, batch_size=records_per_call,
                        compute=model_pool(cfg, len(units)), **gpu)
    write_unit = ray.remote(_write_task).options(name="write_unit", **cpu)
    gathered: dict[str, dict[int, bytes]] = {}
    n_records: dict[str, int] = {}
    ready: deque[list[bytes]] = deque()  # complete units waiting for a write slot
    pending: list = []

    def submit():
        if not ready:  # the common case: no cluster query
            return
        cap = cfg.write_tasks or max(2, int(ray.cluster_resources().get("CPU", 1) / cfg.cpus_per_task / 4))
        while ready and len(pending) < cap:
            pending.append(write_unit.remote(write, cfg, id_column, ready.popleft()))

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for uid, segment, last, blob in zip(batch["unit_id"], batch["segment"], batch["last"], batch["record"]):
            got = gathered.setdefault(uid, {})
            got[int(segment)] = blob
            if last:
                n_records[uid] = int(segment) + 1
            if len(got) == n_records.get(uid):
                ready.append([got[i] for i in range(len(got))])
                del gathered[uid], n_records[uid]
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        submit()
        yield from ray.get(done)
    submit()
    while pending:
        done, pending = ray.wait(pending)
        submit()
        yield from ray.get(done)


def summarise(job: str, batches: Iterator, total: int, output: str) -> dict[str, int]:
    """Drain the stages' result batches with a progress bar (or, without a terminal, a line every
    30 s) over the ``total`` inputs, print each input that is not ``ok`` as it comes, then a closing
    line: the count per status, the wall time and rate, where the outputs and the logs are.
    Returns the counts (``unrecorded``: units whose outputs could not be written)."""
    from aver.console import Progress, duration, logs_dir

    counts: dict[str, int] = {}
    progress = Progress(job, total)
    for batch in batches:
        for item, status, error in zip(batch["item_id"], batch["status"], batch["error"]):
            counts[status] = counts.get(status, 0) + 1
            if status != "ok":
                progress.write(f"  {item}: {status}{' - ' + redact(error) if error else ''}")
        progress.update(len(batch["status"]))
    took = progress.close()
    done = sum(counts.values())
    logs = logs_dir()
    print(f"{job}: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing to do")
          + f" ({done} inputs in {duration(took)}, {done / max(took, 1e-9):.3g}/s); outputs in {redact(output)}"
          + (f"; logs in {logs}" if logs else ""), flush=True)
    if counts.get("failed") or counts.get("unrecorded"):
        print(f"{job}: {counts.get('failed', 0) + counts.get('unrecorded', 0)} inputs hit transient faults that "
              "outlived the retries: run the same command again to finish them", flush=True)
    return counts
