"""The stages every batch job (extract_faces, distill, score_videos) runs, Ray Data's
batch-inference shape (:func:`run_stages`):

1. **load** (CPU tasks, any node): read a unit's inputs (many requests in flight), decode, crop,
   resize; a unit becomes one :class:`Record`, or for a video or a large faces part a record per
   segment (a batch of frames, a slice of crops) and a last one.
2. **model** (:class:`ModelStage`, an autoscaling actor pool, GPU when asked): several records per
   call, their arrays gathered into large batches; the models and nothing else. The model inputs
   are dropped from the records it hands on.
3. **stage out** (CPU tasks, any node): a unit that is one record is committed there and then (its
   parts, status last); a segment of a longer unit is written to the staging area
   (:data:`~aver.pipelines.ledger.STAGING`).
4. **commit** (a Ray task per staged unit, any node, started once all its segments are staged):
   reads the segments back one at a time (as often as the job needs: tracking wants the whole
   video's boxes before any crop is kept), writes the parts, status last, and clears its staging.

The driver plans, schedules and counts: what reaches it per unit or segment is its id, its
segment number and, once committed, a :class:`Summary` (counts per status, a few rows that are
not ok), never crops, embeddings, targets, frames or audio. A record is pickled into one
``record`` column: records differ by job and segment, and one binary column crosses the object
store untouched.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from aver.faults import RetryPolicy, verdict, with_retries
from aver.io.parts import join, remove
from aver.io.storage import is_local, read_bytes, redact, register_secrets, split_credentials, write_bytes_atomic
from aver.io.streaming import trim_heap
from aver.pipelines.ledger import STAGING, Unit, status_row


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
    """CPUs per load, stage-out and commit task (read, decode, crop; write), which run on any node's CPUs."""
    io_threads: int = 16
    """Reads in flight per load task (remote storage is latency-bound)."""
    write_tasks: int = 0
    """Commit tasks of staged units in flight at once; 0: a quarter of the cluster's task slots (CPUs /
    cpus_per_task), at least 2. Units beyond it wait in the driver (their ids): a backlog of tasks
    queued in Ray makes it start a worker process (hundreds of MB, seconds of imports) for each."""
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


@dataclass(kw_only=True)
class Record:
    """What travels from stage to stage for one segment of a unit. Each job subclasses it with the
    fields its stages fill in (frames, detections, crops, targets, ...); a unit whose loading or
    model call failed is a bare record with its ``failure``."""

    unit: Unit
    """The unit it belongs to."""
    segment: int = 0
    """Its place in the unit (0, 1, ...)."""
    last: bool = True
    """It is the unit's last record."""
    failure: tuple[str, str] | None = None
    """(status, error) of what ended the unit; its other fields are then empty."""


Records = Callable[[], Iterator[Record]]
"""A unit's records in order, read again (from the staging area) each time it is called."""


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


def _load_stage(batch: dict, load: Callable, cfg: ActorPoolConfig) -> Iterator[dict]:
    """CPU task: ``load(unit, cfg)`` for each unit, a record or an iterator of records (a video's
    segments), each handed on as soon as it is made; whatever it raises ends the unit with a
    record holding its ``failure``."""
    register_secrets(cfg.storage_options)
    for blob in batch["record"]:
        unit = pickle.loads(blob)
        segment, held = 0, None
        try:
            made = load(unit, cfg)
            for record in ([made] if isinstance(made, Record) else made):
                if held is not None:
                    yield _row(held, segment, False)
                    segment += 1
                held = record
            if held is None:
                raise RuntimeError(f"loading unit {unit.unit_id} gave no record")
        except Exception as e:  # noqa: BLE001 - the commit turns it into the unit's status rows
            if held is not None:
                yield _row(held, segment, False)
                segment += 1
            held = Record(unit=unit, failure=verdict(e, f"unit {unit.unit_id}"))
        yield _row(held, segment, True)
        trim_heap()


def _row(record: Record, segment: int, last: bool) -> dict:
    record.segment, record.last = segment, last
    return {"unit_id": [record.unit.unit_id], "segment": [segment], "last": [last],
            "record": [pickle.dumps(record, protocol=5)]}


class ModelStage:
    """Base of a job's model stage, a Ray Data actor: ``__init__(cfg)`` loads the models once and
    :meth:`run` fills in what they compute for several records at a time (units, or segments of
    videos), gathered into large batches. A record whose content breaks a shared batch is found by
    running each alone; it gets its ``failure``, the others their results. The record fields in
    ``consumed`` (the model inputs) are emptied before the records go on."""

    consumed: ClassVar[tuple[str, ...]] = ("images",)

    def run(self, records: list[Record]) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        records = [pickle.loads(b) for b in batch["record"]]
        todo = [r for r in records if r.failure is None]
        try:
            if todo:
                self.run(todo)
        except Exception:  # noqa: BLE001 - isolate the record that broke the batch
            for r in todo:
                try:
                    self.run([r])
                except Exception as e:  # noqa: BLE001
                    r.failure = verdict(e, f"unit {r.unit.unit_id}")
        for r in records:
            for key in self.consumed:
                if hasattr(r, key):
                    setattr(r, key, None)
        out = {**batch, "record": [pickle.dumps(r, protocol=5) for r in records]}
        del records, todo
        trim_heap()
        return out


NOTED = 10
"""Rows that are not ok a unit's summary names (the rest are counted; status/ holds them all)."""


@dataclass
class Summary:
    """What the driver learns of a committed unit: small, whatever the unit's size."""

    counts: dict[str, int]
    """Inputs per status."""
    noted: list[tuple[str, str, str]]
    """(input, status, error) of the first :data:`NOTED` inputs that are not ok."""
    more: int = 0
    """Inputs not ok beyond those noted."""

    @classmethod
    def of(cls, rows: list[dict], id_column: str) -> "Summary":
        counts: dict[str, int] = {}
        bad = []
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
            if r["status"] != "ok":
                bad.append((r[id_column], r["status"], (r.get("error") or "")[:300]))
        return cls(counts, bad[:NOTED], max(0, len(bad) - NOTED))


def _unrecorded(unit: Unit, error: tuple[str, str], id_column: str) -> list[dict]:
    status, text = error
    return [status_row(id_column, item.get("item_id", unit.unit_id), None, "unrecorded", f"{status}: {text}")
            for item in unit.items]


def _commit(commit: Callable, unit: Unit, records: Records, cfg: ActorPoolConfig, id_column: str) -> str:
    """``commit(unit, records, cfg)``, its status rows summed up as JSON; a unit whose commit itself
    fails (e.g. the output store is down) is reported as not recorded."""
    try:
        rows = commit(unit, records, cfg)
    except Exception as e:  # noqa: BLE001 - nothing recorded: the rerun does the unit again
        rows = _unrecorded(unit, verdict(e, f"unit {unit.unit_id}"), id_column)
    s = Summary.of(rows, id_column)
    return json.dumps({"counts": s.counts, "noted": s.noted, "more": s.more})


def _staged(cfg, unit: Unit, segment: int) -> str:
    return join(cfg.output, STAGING, unit.unit_id, f"{segment:06d}.pkl")


def _stage_out(batch: dict, commit: Callable, cfg: ActorPoolConfig, id_column: str) -> dict:
    """CPU task: a unit that is one record is committed; a segment of a longer one is staged (a
    write that fails leaves the segment missing, and the unit's commit reports it unrecorded)."""
    register_secrets(cfg.storage_options)
    summaries = []
    for blob, segment, last in zip(batch["record"], batch["segment"], batch["last"]):
        record: Record = pickle.loads(blob)
        if segment == 0 and last:
            summaries.append(_commit(commit, record.unit, lambda: iter([record]), cfg, id_column))
        else:
            uri = _staged(cfg, record.unit, int(segment))
            try:
                with_retries(lambda: write_bytes_atomic(uri, blob, cfg.storage_options), cfg.retry, uri)
            except Exception as e:  # noqa: BLE001
                verdict(e, uri)  # logged; the commit finds the segment missing
            summaries.append("")
    trim_heap()
    return {"unit_id": batch["unit_id"], "segment": batch["segment"], "last": batch["last"], "summary": summaries}


def _commit_staged(commit: Callable, cfg: ActorPoolConfig, id_column: str, unit: Unit, n_segments: int) -> str:
    """Ray task: commit a staged unit from its segments (read one at a time, in order), then clear them."""
    register_secrets(cfg.storage_options)
    so = cfg.storage_options

    def records() -> Iterator[Record]:
        for segment in range(n_segments):
            uri = _staged(cfg, unit, segment)
            yield pickle.loads(with_retries(lambda: read_bytes(uri, so), cfg.retry, uri))

    summary = _commit(commit, unit, records, cfg, id_column)
    try:
        remove(join(cfg.output, STAGING, unit.unit_id), so, recursive=True)
    except Exception as e:  # noqa: BLE001 - scratch: the next plan removes it
        verdict(e, f"staging of {unit.unit_id}")
    trim_heap()
    return summary


def model_pool(cfg: ActorPoolConfig, n_units: int):
    """The model stage's actor pool: from one actor up to ``--actors`` (no cap when 0), never more
    than the units. It grows while the cluster has room for one more actor's CPU and GPU share,
    e.g. as the autoscaler adds GPU nodes; it is never sized from a count of CPUs."""
    from ray.data import ActorPoolStrategy

    most = min(cfg.actors, n_units) if cfg.actors else max(1, n_units)
    return ActorPoolStrategy(min_size=1, max_size=most)


def run_stages(units: list[Unit], cfg: ActorPoolConfig, *, load: Callable[[Unit, Any], Record | Iterator[Record]],
               model: type[ModelStage], commit: Callable[[Unit, Records, Any], list[dict]], id_column: str,
               records_per_call: int = 1) -> Iterator[Summary]:
    """Stream ``units`` through load tasks -> ``model`` actors (``records_per_call`` records per
    call) -> stage-out tasks -> a commit task per staged unit; yields each unit's
    :class:`Summary` as it completes. ``cfg.output`` is where parts and staging go. Runs on the
    cluster the job's :func:`~aver.pipelines.cluster.connect` joined once it had planned work."""
    import ray

    cpu = {"num_cpus": cfg.cpus_per_task}
    # max_restarts: a model actor lost with its node comes back wherever a GPU share is free; it also
    # keeps Ray Data from fusing the load tasks into the actors when both ask for the same CPUs.
    gpu = {"num_cpus": cfg.cpus_per_actor, "max_restarts": -1,
           **({"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor > 0 else {})}
    rows = [{"unit_id": u.unit_id, "record": pickle.dumps(u, protocol=5)} for u in units]
    by_id = {u.unit_id: u for u in units}
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    del rows
    ds.context.override_object_store_memory_limit_fraction = cfg.read_ahead  # the stages below copy it
    ds = ds.map_batches(_load_stage, fn_kwargs={"load": load, "cfg": cfg}, batch_size=1, **cpu)
    ds = ds.map_batches(model, fn_constructor_kwargs={"cfg": cfg}, batch_size=records_per_call,
                        compute=model_pool(cfg, len(units)), **gpu)
    ds = ds.map_batches(_stage_out, fn_kwargs={"commit": commit, "cfg": cfg, "id_column": id_column},
                        batch_size=1, **cpu)
    commit_unit = ray.remote(_commit_staged).options(name="commit_unit", **cpu)
    staged: dict[str, set[int]] = {}
    n_segments: dict[str, int] = {}
    ready: deque[tuple[Unit, int]] = deque()  # staged units waiting for a commit slot
    pending: list = []

    def submit():
        if not ready:  # the common case: no cluster query
            return
        cap = cfg.write_tasks or max(2, int(ray.cluster_resources().get("CPU", 1) / cfg.cpus_per_task / 4))
        while ready and len(pending) < cap:
            pending.append(commit_unit.remote(commit, cfg, id_column, *ready.popleft()))

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for uid, segment, last, summary in zip(batch["unit_id"], batch["segment"], batch["last"], batch["summary"]):
            if summary:
                yield _parse(summary)
                continue
            got = staged.setdefault(uid, set())
            got.add(int(segment))
            if last:
                n_segments[uid] = int(segment) + 1
            if len(got) == n_segments.get(uid):
                ready.append((by_id[uid], n_segments[uid]))
                del staged[uid], n_segments[uid]
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        submit()
        yield from map(_parse, ray.get(done))
    submit()
    while pending:
        done, pending = ray.wait(pending)
        submit()
        yield from map(_parse, ray.get(done))
    remove_empty_staging(cfg.output, cfg.storage_options)


def _parse(summary: str) -> Summary:
    s = json.loads(summary)
    return Summary(s["counts"], [tuple(n) for n in s["noted"]], s["more"])


def remove_empty_staging(output: str, storage_options: dict | None) -> None:
    """Remove the staging folder a finished run leaves empty (local folders; object stores have none)."""
    path = join(output, STAGING)
    if is_local(path) and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)


def summarise(job: str, summaries: Iterator[Summary], total: int, output: str) -> dict[str, int]:
    """Drain the units' summaries with a progress bar (or, without a terminal, a line every 30 s)
    over the ``total`` inputs, print each input that is not ``ok`` as it comes (the first few of a
    unit; status/ has them all), then a closing line: the count per status, the wall time and rate,
    where the outputs and the logs are. Returns the counts (``unrecorded``: units whose outputs
    could not be written)."""
    from aver.console import Progress, duration, logs_dir

    counts: dict[str, int] = {}
    progress = Progress(job, total)
    for summary in summaries:
        for status, n in summary.counts.items():
            counts[status] = counts.get(status, 0) + n
        for item, status, error in summary.noted:
            progress.write(f"  {item}: {status}{' - ' + redact(error) if error else ''}")
        if summary.more:
            progress.write(f"  ... and {summary.more} more inputs of that unit not ok (see {redact(output)}/status)")
        progress.update(sum(summary.counts.values()))
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
