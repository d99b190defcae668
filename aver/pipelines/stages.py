"""The stages every batch job (extract_faces, distill, score_videos) runs, Ray Data's
batch-inference shape (:func:`run_stages`):

1. **load** (CPU tasks, any node): read a unit's inputs (many requests in flight), decode, crop,
   resize; a unit becomes one :class:`Record`, or for a video or a large faces part a record per
   segment (a batch of frames, a slice of crops) and a last one.
2. **model** (:class:`ModelStage`, an autoscaling actor pool, GPU when asked): several records per
   call, their arrays gathered into large batches; the models and nothing else. The model inputs
   are dropped from the records it hands on.
3. **stage out and commit** (CPU tasks, any node): a unit that is one record is committed there
   and then (its parts, status last). A segment of a longer unit is written to the staging area
   (:data:`~aver.pipelines.ledger.STAGING`); the task that stages a unit's last missing segment
   (a small actor on the driver's node counts them) commits the unit: it reads the segments back
   one at a time (as often as the job needs: tracking wants the whole video's boxes before any
   crop is kept), writes the parts, status last, and clears the unit's staging.

A video longer than the job's ``clip_s`` is planned as clip units (:func:`plan_long_inputs`), each
read by its own load task on any node: a clip's segments are kept in ``_clips/<input>/<clip>/`` and
the clip marked committed when its last one is; the task that ends an input's last clip commits
the input from all its clips, in order, one segment at a time (:func:`_finalize`).

The driver plans, schedules and counts: what reaches it per unit is a :class:`Summary` (counts
per status, a few rows that are not ok), whatever the unit's length, never crops, embeddings,
targets, frames or audio. Records travel as blocks of :func:`pack`: each record's pickle,
with its arrays' memory out of band in one binary column (records differ by job and segment, and
one binary column crosses the object store untouched): copied once into the block, then read in
place by the stage that takes it (:func:`unpack`), never copied again by unpickling.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from aver.faults import RETRIED, RetryPolicy, guarded_map, verdict, with_retries
from aver.io.parts import join, remove
from aver.io.storage import absolute, read_bytes, redact, register_secrets, split_credentials, write_bytes_atomic
from aver.io.streaming import trim_heap
from aver.pipelines.ledger import CLIPS, STAGING, Clip, Unit, plan_clips, status_row


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
    """Stage-out tasks (which write parts and commit units) in flight at once; 0: as many as Ray Data
    finds room for."""
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
            setattr(self, name, absolute(uri))  # tasks run in other folders, on other machines
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
    ends_input: bool = False
    """On a clip's last record: the input's usable video ends in this clip (its stream broke): the
    clips after it are not read, nor used."""
    node: str | None = None
    """On a unit's last record: the node whose load task read it."""


Records = Callable[[], Iterator[Record]]
"""A unit's records in order, read again (from the staging area) each time it is called."""


def _load_stage(batch: dict, load: Callable, cfg: ActorPoolConfig, segments=None) -> Iterator[dict]:
    """CPU task: ``load(unit, cfg)`` for each unit, a record or an iterator of records (a video's
    segments), each handed on as soon as it is made; whatever it raises ends the unit with a
    record holding its ``failure``. A video clip after one whose stream broke is not read."""
    import ray

    register_secrets(cfg.storage_options)
    node = ray.get_runtime_context().get_node_id()
    for blob in batch["record"]:
        unit = pickle.loads(blob)
        segment, held = 0, None
        clip = unit.clip
        if clip is not None and clip.range is not None and segments is not None and \
                ray.get(segments.ended_before.remote(clip.input.unit_id, clip.index)):
            # a bare record the models pass by; the input's commit never reads it
            yield _row(Record(unit=unit, node=node, failure=("skipped", "after the stream ended")), 0, True)
            continue
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
        held.node = node
        yield _row(held, segment, True)
        trim_heap()


def _row(record: Record, segment: int, last: bool):
    record.segment, record.last = segment, last
    return pack([record])


def pack(records: list[Record]):
    """``records`` as a block (a ``pyarrow.Table``, one row each): the pickle of each (``record``)
    and the memory of its contiguous arrays (frames, crops, audio), laid end to end in ``payload``
    (pickle protocol 5's out-of-band buffers; ``sizes`` says where each ends). That is the one copy
    a record's arrays take on their way into the object store: the stage that reads the block
    rebuilds them in place (:func:`unpack`), where a pickle of the whole record copied them twice
    more (into bytes, and out again)."""
    import pyarrow as pa

    heads, sizes, chunks = [], [], []
    for r in records:
        buffers: list[pickle.PickleBuffer] = []
        heads.append(pickle.dumps(r, protocol=5, buffer_callback=buffers.append))
        raw = [b.raw() for b in buffers]
        sizes.append([m.nbytes for m in raw])
        chunks.append(raw)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + sum(s))
    # a bytearray, not np.empty: NumPy asks for huge pages for large arrays (madvise), and in a busy
    # worker the kernel's compaction to find them took 5x the copy itself (0.33 vs 0.065 s per 110 MB)
    data = bytearray(offsets[-1])
    into, at = memoryview(data), 0
    for raw in chunks:
        for m in raw:
            into[at:at + m.nbytes] = m
            at += m.nbytes
    payload = pa.Array.from_buffers(pa.large_binary(), len(records),
                                    [None, pa.array(offsets, pa.int64()).buffers()[1], pa.py_buffer(data)])
    return pa.table({"record": pa.array(heads, pa.binary()), "sizes": pa.array(sizes, pa.list_(pa.int64())),
                     "payload": payload})


def unpack(block) -> list[Record]:
    """The records of a block of :func:`pack`; their arrays are views of the block's memory
    (read-only when it lies in the object store)."""
    records = []
    heads, sizes = block["record"], block["sizes"]
    for i, memory in enumerate(_values(block["payload"])):
        at, buffers = 0, []
        for n in sizes[i].as_py():
            buffers.append(memory[at:at + n])
            at += n
        records.append(pickle.loads(heads[i].as_py(), buffers=buffers))
    return records


def _values(column) -> Iterator[memoryview]:
    """Each value of a ``large_binary`` column, a view of its memory (a scalar's ``as_buffer``
    copies it)."""
    import numpy as np

    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, np.int64, count=len(chunk) + 1, offset=chunk.offset * 8)
        memory = memoryview(data) if data is not None else memoryview(b"")
        for k in range(len(chunk)):
            yield memory[ends[k]:ends[k + 1]]


class ModelStage:
    """Base of a job's model stage, a Ray Data actor: ``__init__(cfg)`` loads the models once and
    :meth:`run` fills in what they compute for several records at a time (units, or segments of
    videos), gathered into large batches. A record whose content breaks a shared batch is found by
    running each alone; it gets its ``failure``, the others their results. The record fields in
    ``consumed`` (the model inputs) are emptied before the records go on."""

    consumed: ClassVar[tuple[str, ...]] = ("images",)
    device: Any = None
    """The torch device its ``__init__`` put the models on."""

    def run(self, records: list[Record]) -> None:
        raise NotImplementedError

    def __call__(self, batch):
        records = unpack(batch)
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
        out = pack(records)
        del records, todo
        if getattr(self.device, "type", "cpu") == "cpu":
            # a CPU actor's heap holds the batches' activations; a GPU actor's only small host buffers,
            # and the trim (a walk of the whole heap) would stall the host between GPU batches
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


class _StagedSegments:
    """Ray actor on the driver's node (no CPUs): which segments of each staged unit are in the
    staging area. It answers the stage-out task that stages a unit's last missing segment with the
    unit's segment count (and every other with 0): that task commits the unit, once. A retried task
    of the same segment (its worker died) gets the claim again; the commit it redoes is idempotent.
    For long inputs it also counts the clips still to end (the task that ends the last one commits
    the input) and which clip's stream broke (the clips after it are not read)."""

    def __init__(self, clips_left: dict[str, set[str]] | None = None):
        self.staged: dict[str, set[int]] = {}
        self.total: dict[str, int] = {}
        self.claimed: dict[str, int] = {}  # unit -> the segment whose task commits it
        self.clips_left = clips_left or {}  # input -> its clips not ended yet in this run
        self.ended_at: dict[str, int] = {}  # input -> first clip whose stream broke

    def staged_one(self, unit_id: str, segment: int, n_segments: int | None) -> int:
        if unit_id in self.claimed:
            return self.total[unit_id] if self.claimed[unit_id] == segment else 0
        got = self.staged.setdefault(unit_id, set())
        got.add(segment)
        if n_segments is not None:
            self.total[unit_id] = n_segments
        if len(got) != self.total.get(unit_id):
            return 0
        del self.staged[unit_id]
        self.claimed[unit_id] = segment
        return self.total[unit_id]

    def input_ends(self, input_id: str, index: int) -> None:
        self.ended_at[input_id] = min(index, self.ended_at.get(input_id, index))

    def ended_before(self, input_id: str, index: int) -> bool:
        return self.ended_at.get(input_id, index) < index

    def clip_ended(self, input_id: str, name: str) -> bool:
        """Whether ``name`` was the input's last clip to end (its caller commits the input)."""
        left = self.clips_left.get(input_id)
        if left is None or name not in left:
            return False  # a retried task's second report: the first one decided
        left.discard(name)
        return not left


def _stage_out(batch, commit: Callable, cfg: ActorPoolConfig, id_column: str, segments, run_id: str) -> dict:
    """CPU task: a unit that is one record is committed; a segment of a longer one is staged, and
    the task that stages its unit's last missing segment commits the unit from the staging area
    (read back one segment at a time) and clears it. A clip of a long input is kept in
    ``_clips/`` and marked committed instead; the task that ends an input's last clip commits the
    input from all its clips. Only the committed inputs' summaries go on to the driver. A staging
    write that fails still counts the segment: the commit finds it missing and reports the unit
    unrecorded (the rerun does it again)."""
    import ray

    register_secrets(cfg.storage_options)
    so = cfg.storage_options
    summaries = []
    for record in unpack(batch):
        unit, segment, last, clip = record.unit, record.segment, record.last, record.unit.clip
        if segment == 0 and last and clip is None:
            summaries.append(_commit(commit, unit, lambda: iter([record]), cfg, id_column))
            continue
        uri, blob = _staged(cfg, unit, segment), pickle.dumps(record, protocol=5)
        try:
            with_retries(lambda: write_bytes_atomic(uri, blob, so), cfg.retry, uri)
        except Exception as e:  # noqa: BLE001
            verdict(e, uri)  # logged; the commit finds the segment missing
        ending = {"node": record.node, "ends": record.ends_input,
                  "failed": bool(record.failure and record.failure[0] in RETRIED)} if last else None
        record = blob = None  # staged: not held through the commit
        if clip is not None and ending is not None and ending["ends"]:
            ray.get(segments.input_ends.remote(clip.input.unit_id, clip.index))
        n_segments = ray.get(segments.staged_one.remote(unit.unit_id, segment, segment + 1 if last else None))
        if n_segments and clip is None:
            summaries.append(_commit(commit, unit, _staged_records(cfg, unit, n_segments), cfg, id_column))
            try:
                remove(join(cfg.output, STAGING, unit.unit_id), so, recursive=True)
            except Exception as e:  # noqa: BLE001 - scratch: the run's end (or the next plan) removes it
                verdict(e, f"staging of {unit.unit_id}")
        elif n_segments:
            summary = _end_clip(commit, clip, n_segments, ending, cfg, id_column, segments, run_id)
            if summary is not None:
                summaries.append(summary)
        trim_heap()
    return {"summary": summaries}


def _end_clip(commit: Callable, clip: Clip, n_segments: int, ending: dict | None, cfg: ActorPoolConfig,
              id_column: str, segments, run_id: str) -> str | None:
    """A clip's segments are all kept: mark it committed (``.done``, or ``.failed`` when a transient
    fault outlived the retries: a rerun reads it again), and commit the input if it was the last."""
    import ray

    so, ending = cfg.storage_options, ending or {}
    mark = {"n_segments": n_segments, "node": ending.get("node"), "ends": bool(ending.get("ends")), "run": run_id}
    uri = join(_clip_folder(cfg, clip), f"{clip.name}.{'failed' if ending.get('failed') else 'done'}")
    try:
        with_retries(lambda: write_bytes_atomic(uri, json.dumps(mark).encode(), so), cfg.retry, uri)
    except Exception as e:  # noqa: BLE001 - the input's commit finds the clip missing: a rerun redoes it
        verdict(e, uri)
    if not ray.get(segments.clip_ended.remote(clip.input.unit_id, clip.name)):
        return None
    return _finalize(commit, clip, cfg, id_column)


def _finalize(commit: Callable, clip: Clip, cfg: ActorPoolConfig, id_column: str) -> str:
    """Commit a long input from its clips (video clips after one whose stream broke left out), its
    ``clips/`` part (where and in which run each clip was read) first; then remove its clips, unless
    a clip is to be read again."""
    import pyarrow as pa

    from aver.io.parts import write_table

    so, folder = cfg.storage_options, _clip_folder(cfg, clip)
    marks: list[tuple[str, dict]] = []
    for name in clip.names:
        for state in ("done", "failed"):
            uri = join(folder, f"{name}.{state}")
            try:
                marks.append((name, {**json.loads(with_retries(lambda: read_bytes(uri, so), cfg.retry, uri)),
                                     "state": state}))
                break
            except FileNotFoundError:
                continue
        else:
            marks.append((name, {"n_segments": 0, "state": "missing"}))
    # video clips after the one whose stream broke are left out (as a read of the whole input ends there)
    ended = next((k for k, (_, m) in enumerate(marks) if m.get("ends")), len(marks))
    used = [k <= ended or clip.ranges[k] is None for k in range(len(marks))]

    def records() -> Iterator[Record]:
        for (name, m), use in zip(marks, used):
            if not use:
                continue
            if m["state"] == "missing":
                raise OSError(f"clip {name} of {clip.input.unit_id} was not kept: read it again")
            for segment in range(m["n_segments"]):
                uri = join(folder, name, f"{segment:06d}.pkl")
                yield pickle.loads(with_retries(lambda: read_bytes(uri, so), cfg.retry, uri))

    rows = [{id_column: clip.input.unit_id, "clip": name, "start_s": span.start_s if span else None,
             "end_s": span.end_s if span else None, "node_id": m.get("node"), "run_id": m.get("run"),
             "state": m["state"], "used": use} for (name, m), span, use in zip(marks, clip.ranges, used)]
    part = join(cfg.output, "clips", f"{clip.input.unit_id}.parquet")
    try:
        table = pa.Table.from_pylist(rows, schema=clips_schema(id_column))
        with_retries(lambda: write_table(part, table, so), cfg.retry, part)
        summary = _commit(commit, clip.input, records, cfg, id_column)
    except Exception as e:  # noqa: BLE001 - nothing recorded: the rerun commits it again
        s = Summary.of(_unrecorded(clip.input, verdict(e, f"unit {clip.input.unit_id}"), id_column), id_column)
        summary = json.dumps({"counts": s.counts, "noted": s.noted, "more": s.more})
    counts = json.loads(summary)["counts"]
    if not any(counts.get(status) for status in (*RETRIED, "unrecorded")) and all(m["state"] == "done" for _, m in marks):
        try:
            remove(folder, so, recursive=True)
        except Exception as e:  # noqa: BLE001 - the next plan removes the clips of complete inputs
            verdict(e, f"clips of {clip.input.unit_id}")
    return summary


def clips_schema(id_column: str):
    """``clips/``: one row per clip of a long input: its range, the node that read it, in which run."""
    import pyarrow as pa

    return pa.schema([(id_column, pa.string()), ("clip", pa.string()), ("start_s", pa.float64()),
                      ("end_s", pa.float64()), ("node_id", pa.string()), ("run_id", pa.string()),
                      ("state", pa.string()), ("used", pa.bool_())])


def _staged(cfg, unit: Unit, segment: int) -> str:
    if unit.clip is not None:
        return join(_clip_folder(cfg, unit.clip), unit.clip.name, f"{segment:06d}.pkl")
    return join(cfg.output, STAGING, unit.unit_id, f"{segment:06d}.pkl")


def _clip_folder(cfg, clip: Clip) -> str:
    return join(cfg.output, CLIPS, clip.input.unit_id)


def _staged_records(cfg: ActorPoolConfig, unit: Unit, n_segments: int) -> Records:
    def records() -> Iterator[Record]:
        for segment in range(n_segments):
            uri = _staged(cfg, unit, segment)
            yield pickle.loads(with_retries(lambda: read_bytes(uri, cfg.storage_options), cfg.retry, uri))
    return records


def model_pool(cfg: ActorPoolConfig, n_units: int):
    """The model stage's actor pool: from one actor up to ``--actors`` (no cap when 0), never more
    than the units. It grows while the cluster has room for one more actor's CPU and GPU share,
    e.g. as the autoscaler adds GPU nodes; it is never sized from a count of CPUs."""
    from ray.data import ActorPoolStrategy

    most = min(cfg.actors, n_units) if cfg.actors else max(1, n_units)
    # A CPU actor runs its calls one after another with its arguments already in the node's store:
    # a second call sent ahead (Ray Data's default) only holds its records; a GPU actor keeps it, to
    # fetch the next call's records while the GPU computes.
    ahead = 1 if cfg.gpus_per_actor == 0 else None
    return ActorPoolStrategy(min_size=1, max_size=most, max_tasks_in_flight_per_actor=ahead)


def run_stages(units: list[Unit], cfg: ActorPoolConfig, *, load: Callable[[Unit, Any], Record | Iterator[Record]],
               model: type[ModelStage], commit: Callable[[Unit, Records, Any], list[dict]], id_column: str,
               records_per_call: int = 1, finalize: list[Clip] = ()) -> Iterator[Summary]:
    """Stream ``units`` through load tasks -> ``model`` actors (``records_per_call`` records per
    call) -> stage-out tasks, which commit each unit once all its records are out (a long input
    once all its clips are); yields each input's :class:`Summary` as it completes, and nothing else
    reaches the driver. ``finalize``: a clip of each input whose clips were all committed by an
    earlier run (its commit is left to do). ``cfg.output`` is where parts and staging go. Runs on
    the cluster the job's :func:`~aver.pipelines.cluster.connect` joined once it had planned work."""
    import time
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpu = {"num_cpus": cfg.cpus_per_task}
    # max_restarts: a model actor lost with its node comes back wherever a GPU share is free; it also
    # keeps Ray Data from fusing the load tasks into the actors when both ask for the same CPUs.
    gpu = {"num_cpus": cfg.cpus_per_actor, "max_restarts": -1,
           **({"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor > 0 else {})}
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    finishing = [ray.remote(_finalize).options(**cpu, max_retries=3).remote(commit, clip, cfg, id_column)
                 for clip in finalize]
    if units:
        clips_left: dict[str, set[str]] = {}
        for u in units:
            if u.clip is not None:
                clips_left.setdefault(u.clip.input.unit_id, set()).add(u.clip.name)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        segments = ray.remote(_StagedSegments).options(num_cpus=0, scheduling_strategy=here).remote(clips_left)
        rows = [{"unit_id": u.unit_id, "record": pickle.dumps(u, protocol=5)} for u in units]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        del rows
        ds.context.override_object_store_memory_limit_fraction = cfg.read_ahead  # the stages below copy it
        # Within that share, no more records queued for the models than the models hold in flight (Ray
        # Data's downstream-capacity backpressure): decoding outpaces them, and a deeper queue only
        # holds decoded frames longer (bench (e): 1.13-1.16 against 1.13-1.28 without it).
        ds.context.downstream_capacity_backpressure_ratio = 1.0
        # Each record its own block (Ray Data's default packs a task's outputs into blocks of up to
        # 128 MiB): a model call then takes whole blocks, where slicing a two-record block copied
        # all of it (a segment of 32 720p frames is 110 MB); small records still share a block.
        ds.context.target_max_block_size = 2**20
        ds = ds.map_batches(_load_stage, fn_kwargs={"load": load, "cfg": cfg, "segments": segments},
                            batch_size=1, **cpu)
        ds = ds.map_batches(model, fn_constructor_kwargs={"cfg": cfg}, batch_size=records_per_call,
                            batch_format="pyarrow", compute=model_pool(cfg, len(units)), **gpu)
        ds = ds.map_batches(_stage_out, fn_kwargs={"commit": commit, "cfg": cfg, "id_column": id_column,
                                                   "segments": segments, "run_id": run_id},
                            batch_size=1, batch_format="pyarrow", concurrency=cfg.write_tasks or None, **cpu)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield from map(_parse, batch["summary"])
        ray.kill(segments)
    yield from map(_parse, ray.get(finishing))
    # Every unit is committed or reported: what staging holds (a unit whose commit failed, segments
    # staged again by a retried task) is scratch.
    remove(join(cfg.output, STAGING), cfg.storage_options, recursive=True)


CLIP_S = 300.0
"""Default clip length of long videos: five minutes is 1500 frames at 5 fps, seconds of decoding
and a few staged segments, so a clip's seek and bookkeeping cost under 1%, while a 10-hour
recording still spreads over 120 clips (docs/decisions.md)."""


def check_clip_s(clip_s: float, fps: float) -> None:
    if clip_s != 0 and clip_s * fps < 1:
        raise ValueError(f"clip_s must be 0 (no clips) or hold at least one frame at {fps} fps, got {clip_s}")


def say_clips(job: str, units: list[Unit], finalize: list[Clip]) -> None:
    """Print how the long inputs were cut: clips to read now, and clips read by an earlier run."""
    long: dict[str, tuple[int, int]] = {}
    for u in units:
        if u.clip is not None:
            total, todo = long.get(u.clip.input.unit_id, (len(u.clip.names), 0))
            long[u.clip.input.unit_id] = (total, todo + 1)
    if long or finalize:
        total = sum(t for t, _ in long.values()) + sum(len(c.names) for c in finalize)
        todo = sum(n for _, n in long.values())
        print(f"{job}: {len(long) + len(finalize)} long inputs in {total} clips; {todo} to read, "
              f"{total - todo} read before", flush=True)


PROBES_PER_TASK = 64
"""Videos whose headers one planning task reads (``io_threads`` at a time)."""


def plan_long_inputs(units: list[Unit], cfg: ActorPoolConfig, *, clip_s: float, fps: float,
                     max_duration_s: float, audio: bool) -> tuple[list[Unit], list[Clip]]:
    """The units of videos longer than ``clip_s`` (by their headers: read here for a few videos, else
    in Ray tasks on any node, :data:`PROBES_PER_TASK` each) cut into clips (:func:`~aver.pipelines.ledger.plan_clips`); ``clip_s`` 0 cuts none."""
    import ray

    videos = [u for u in units if u.clip is None and len(u.items) == 1 and u.items[0].get("kind") == "video"
              and not u.items[0].get("refusal")]
    if not clip_s or not videos:
        return units, []
    items = [u.items[0] for u in videos]
    if len(items) <= PROBES_PER_TASK:  # a few headers: read here, sparing a worker's start
        found = _probe_videos(items, cfg, clip_s)
    else:
        found = {}
        probe = ray.remote(_probe_videos).options(num_cpus=cfg.cpus_per_task)
        for got in ray.get([probe.remote(items[i:i + PROBES_PER_TASK], cfg, clip_s)
                            for i in range(0, len(items), PROBES_PER_TASK)]):
            found.update(got)
    return plan_clips(cfg.output, cfg.storage_options, units, found, clip_s=clip_s, fps=fps, audio=audio,
                      max_duration_s=max_duration_s)


def _probe_videos(items: list[dict], cfg: ActorPoolConfig, clip_s: float) -> dict[str, tuple[float, float]]:
    """Planning task: ``item id -> (duration, first frame's time)`` of the videos longer than ``clip_s``."""
    from aver.io.media import probe_video

    register_secrets(cfg.storage_options)
    got = guarded_map(lambda item: probe_video(item["source"], storage_options=cfg.storage_options,
                                               longer_than=clip_s), items, cfg.io_threads, cfg.retry,
                      lambda item: item["source"])
    # a video that cannot be probed is read whole: reading it decides its status
    return {item["item_id"]: probe for item, (probe, _) in zip(items, got) if probe is not None}


def _parse(summary: str) -> Summary:
    s = json.loads(summary)
    return Summary(s["counts"], [tuple(n) for n in s["noted"]], s["more"])


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
