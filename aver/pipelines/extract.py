"""extract_faces: media -> ``faces/`` (one row per sampled frame, primary person) + ``status/``.

Work is cut into units (one video, or a chunk of images); each unit's rows go to
``faces/<unit>.parquet`` and then its status rows to ``status/<unit>.parquet``, both written
atomically, so a rerun skips exactly the units that completed and never duplicates a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from aver.faces import (Decoded, Detection, FaceDetector, FaceDetectorConfig, TrackedFrame, detect_frames,
                        detection_view, frame_segments, track_frames, with_crops)
from aver.faults import guarded, guarded_map, with_retries
from aver.io.media import (FRAME_MAX_SIDE, MAX_DURATION_S, InputItem, VideoFrame, decode_threads, list_inputs,
                           load_image)
from aver.io.storage import redact
from aver.pipelines.cluster import actor_setup, connect
from aver.pipelines.ledger import Plan, Unit, commit, plan, status_row
from aver.pipelines.stages import (CLIP_S, ActorPoolConfig, ModelStage, Record, Records, check_clip_s,
                                   plan_long_inputs, run_stages, say_clips, summarise)
from aver.tracking import FaceTracker, TrackerConfig

FACES_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("source", pa.string()),
    ("crop_id", pa.string()),
    ("frame_index", pa.int64()),
    ("timestamp_s", pa.float64()),
    ("track_id", pa.int32()),
    ("box", pa.list_(pa.float32(), 4)),
    ("prob", pa.float32()),
    ("crop", pa.binary()),
])


@dataclass
class ExtractFacesConfig(ActorPoolConfig):
    uri_fields = ("input", "output")

    input: str
    """Videos/images: a folder, a glob, a manifest (.txt/.csv/.parquet with `source`) or one file."""
    output: str
    """Output folder (local or fsspec URI); gets faces/ and status/."""
    fps: float = 5.0
    """Frames sampled per second of video (by presentation timestamp)."""
    detector: FaceDetectorConfig = field(default_factory=FaceDetectorConfig)
    """MTCNN and crop settings."""
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    """How a video's detections become tracks and people (the primary person's crops are kept)."""
    images_per_unit: int = 256
    """Images handled (and written) together as one unit of work."""
    max_bytes: int = 20 * 2**30
    """Inputs larger than this get status too_large."""
    max_duration_s: float = MAX_DURATION_S
    """Videos that decode longer than this get status too_large."""
    frame_max_side: int = FRAME_MAX_SIDE
    """Sampled frames larger than this on their longer side are downscaled where they are decoded."""
    clip_s: float = CLIP_S
    """Videos longer than this (by their headers) are read as clips of this length on any nodes at
    once, and resumed clip by clip; 0: every video read whole by one task."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tracker, dict):
            self.tracker = TrackerConfig(**self.tracker)
        if self.fps <= 0 or self.fps > 120:
            raise ValueError(f"fps must be in (0, 120], got {self.fps}")
        check_clip_s(self.clip_s, self.fps)
        if self.images_per_unit < 1:
            raise ValueError("images_per_unit must be >= 1")


def crop_id(video_id: str, frame_index: int) -> str:
    return f"{video_id}-{frame_index:07d}"


@dataclass(kw_only=True)
class FacesRecord(Record):
    """extract_faces' record: a chunk of images, a segment of a video's frames, or a video's last
    record (what decoding saw)."""

    images: list[tuple[InputItem, np.ndarray]] | None = None
    """A chunk's decoded images (model input)."""
    views: list[tuple[np.ndarray, float]] | None = None
    """The images' :func:`~aver.faces.detection_view` (model input, made in the load task)."""
    statuses: list[dict] = field(default_factory=list)
    """Status rows of a chunk's images (those that did not load, then the rest once detected)."""
    faces: pa.Table | None = None
    """A chunk's faces rows, once detected."""
    frames: list[VideoFrame] | None = None
    """A segment's sampled frames (model input)."""
    detected: list[tuple[int, float, bool, list[tuple[Detection, bytes]]]] | None = None
    """A segment's frames as (frame index, time, shot cut before it, [(detection, JPEG crop)]), best face first."""
    decoded: Decoded | None = None
    """On a video's last record: what decoding saw."""


def load_images(items: list[InputItem],
                cfg: ExtractFacesConfig) -> tuple[list[tuple[InputItem, np.ndarray]], list[dict]]:
    """The images that load (``io_threads`` reads in flight), and a status row for each that does not."""
    results = guarded_map(lambda item: item.check() or load_image(item.source, storage_options=cfg.storage_options),
                          items, cfg.io_threads, cfg.retry, lambda item: item.source)
    loaded, statuses = [], []
    for item, (image, failure) in zip(items, results):
        if failure:
            statuses.append(status_row("video_id", item.item_id, redact(item.source), *failure))
        else:
            loaded.append((item, image))
    return loaded, statuses


def image_rows(loaded: list[tuple[InputItem, np.ndarray]], detections: list, detector: FaceDetector,
               cfg: ExtractFacesConfig) -> tuple[list[dict], list[dict]]:
    """One faces row per image (its most confident face, or nulls) and one status row per image;
    a detection given as ``(None, failure)`` (the image broke the detector) costs its own row only.
    The crops are cut and encoded together, on the detector's device."""
    rows, statuses, found = [], [], []
    for (item, img), dets in zip(loaded, detections):
        source = redact(item.source)
        if isinstance(dets, tuple):  # (detections, failure) from the one-by-one pass
            dets, failure = dets
            if failure:
                statuses.append(status_row("video_id", item.item_id, source, *failure))
                continue
        best = next((d for d in dets if d.prob >= cfg.tracker.high_prob), None)  # the most confident face
        found.append((img, best))
        rows.append({
            "video_id": item.item_id, "source": source, "crop_id": crop_id(item.item_id, 0),
            "frame_index": 0, "timestamp_s": 0.0, "track_id": 0 if best else None,
            "box": [float(v) for v in best.box] if best else None,
            "prob": float(best.prob) if best else None,
        })
        statuses.append(status_row("video_id", item.item_id, source, "ok" if best else "no_face", n_frames=1))
    crops = iter(detector.encode(detector.crops([img for img, _ in found], [[b.box] if b else [] for _, b in found])))
    for row, (_, best) in zip(rows, found):
        row["crop"] = next(crops) if best else None
    return rows, statuses


def _faces_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FACES_SCHEMA)


def plan_units(items: list[InputItem], cfg: ExtractFacesConfig) -> Plan:
    """Each video its own unit; images in chunks of pending images (see :mod:`aver.pipelines.ledger`)."""
    return plan(cfg.output, cfg.storage_options,
                singles=[(i.item_id, vars(i)) for i in items if i.kind != "image"],
                chunked={"images": [(i.item_id, vars(i)) for i in items if i.kind == "image"]},
                per_unit=cfg.images_per_unit, output_folders=("faces",))


def load_unit(unit: Unit, cfg: ExtractFacesConfig) -> FacesRecord | Iterator[FacesRecord]:
    """Load stage (CPU task): a chunk's images read and decoded, or a video's sampled frames in
    segments of ``detector.batch_size`` and a last record saying what decoding saw."""
    items = [InputItem(**i) for i in unit.items]
    if items[0].kind == "image":
        loaded, statuses = load_images(items, cfg)
        views = [detection_view(img, cfg.detector) for _, img in loaded]  # CPU work the model's actor skips
        return FacesRecord(unit=unit, images=loaded, views=views, statuses=statuses)
    return _video_segments(unit, items[0], cfg)


def _video_segments(unit: Unit, item: InputItem, cfg: ExtractFacesConfig) -> Iterator[FacesRecord]:
    item.check()
    decoded = Decoded()
    for frames in frame_segments(item.source, decoded, fps=cfg.fps, detector=cfg.detector, retry=cfg.retry,
                                 max_side=cfg.frame_max_side, storage_options=cfg.storage_options,
                                 max_bytes=cfg.max_bytes, max_duration_s=cfg.max_duration_s,
                                 cut_distance=cfg.tracker.cut_distance, clip=unit.clip and unit.clip.range,
                                 threads=decode_threads(cfg.cpus_per_task)):
        yield FacesRecord(unit=unit, frames=frames)
    yield FacesRecord(unit=unit, decoded=decoded, ends_input=decoded.ends_input)


class FaceExtractor(ModelStage):
    """Model stage (Ray Data actor): one FaceDetector (GPU when given one); the images of several
    chunks, or the frames of several video segments, are detected together."""

    consumed = ("images", "views", "frames")

    def __init__(self, cfg: ExtractFacesConfig) -> None:
        self.cfg = cfg
        self.device = actor_setup(cfg, "FaceExtractor")
        self.detector = FaceDetector(cfg.detector, device=str(self.device))

    def run(self, records: list[FacesRecord]) -> None:
        chunks = [r for r in records if r.images is not None]
        loaded = [pair for r in chunks for pair in r.images]
        views = [v for r in chunks for v in r.views]
        try:
            detections = self.detector.detect([img for _, img in loaded], views) if loaded else []
        except Exception:  # noqa: BLE001 - find the image that broke the batch: each alone
            detections = [guarded(lambda: self.detector.detect([img], [view])[0], self.cfg.retry, item.source)
                          for (item, img), view in zip(loaded, views)]
        start = 0
        for r in chunks:
            n = len(r.images)
            rows, statuses = image_rows(r.images, detections[start:start + n], self.detector, self.cfg)
            r.faces, r.statuses = _faces_table(rows), r.statuses + statuses
            start += n
        segments = [r for r in records if r.frames]
        frames = [f for r in segments for f in r.frames]
        found, crops = detect_frames(self.detector, frames) if frames else ([], [])
        found = with_crops(found, self.detector.encode(crops))
        start = 0
        for r in segments:
            n = len(r.frames)
            r.detected = [(f.index, f.timestamp_s, f.cut, faces) for f, faces in zip(r.frames, found[start:start + n])]
            start += n


def write_unit(unit: Unit, records: Records, cfg: ExtractFacesConfig) -> list[dict]:
    """Commit: ``faces/<unit>.parquet`` then the unit's status rows. A video's segments are read
    twice, one at a time: their boxes linked into tracks and people (the primary person is known
    only at the end), then the primary person's crops written segment by segment."""
    item = InputItem(**unit.items[0])
    tracker, decoded, n = FaceTracker(cfg.tracker), None, 0
    for r in records():
        if r.failure:
            statuses = [status_row("video_id", i["item_id"], redact(i["source"]), *r.failure) for i in unit.items]
            return _commit(cfg, unit, _faces_table([]), statuses)
        if r.faces is not None:  # a chunk of images: one record
            return _commit(cfg, unit, r.faces, r.statuses)
        n += len(track_frames(tracker, r.detected or (), n))
        decoded = decoded.then(r.decoded) if decoded is not None else r.decoded  # one per clip of a long video
    people = tracker.people()
    primary, source = tracker.primary(people), redact(item.source)

    def faces() -> Iterator[pa.Table]:  # the same tracks again, segment by segment: the primary's crops
        again, step = FaceTracker(cfg.tracker), 0
        for r in records():
            frames = track_frames(again, r.detected or (), step)
            step += len(frames)
            yield _faces_table([_frame_row(item, source, frame, people, primary) for frame in frames])

    status = status_row("video_id", item.item_id, source, n_frames=n, duration_s=round(decoded.decoded_s, 6))
    if decoded.broken is not None:
        status.update(status=decoded.broken.status, error=f"{decoded.broken} (after {n} frames)")
    elif primary is None:
        status["status"] = "no_face"
    return _commit(cfg, unit, faces, [status])


def _frame_row(item: InputItem, source: str, frame: TrackedFrame, people: dict[int, int], primary: int | None) -> dict:
    """One faces row of a video's sampled frame: the primary person's face, or nulls."""
    hit = next(((d, jpeg) for tid, d, jpeg in frame.faces if people.get(tid, -1) == primary), None)
    return {"video_id": item.item_id, "source": source, "crop_id": crop_id(item.item_id, frame.index),
            "frame_index": frame.index, "timestamp_s": frame.timestamp_s, "track_id": primary if hit else None,
            "box": [float(v) for v in hit[0].box] if hit else None, "prob": float(hit[0].prob) if hit else None,
            "crop": hit[1] if hit else None}


def _commit(cfg: ExtractFacesConfig, unit: Unit, faces, statuses: list[dict]) -> list[dict]:
    commit(cfg.output, unit, {"faces": (faces, FACES_SCHEMA, "video_id")}, statuses, id_column="video_id",
           storage_options=cfg.storage_options, policy=cfg.retry)
    return statuses


def run(cfg: ExtractFacesConfig) -> dict[str, int]:
    """Run the job on the current Ray cluster (``ray.init()`` starts a local one if none);
    returns the count of each status among the inputs processed now."""
    items = with_retries(lambda: list_inputs(cfg.input, cfg.storage_options), cfg.retry, cfg.input)
    work = with_retries(lambda: plan_units(items, cfg), cfg.retry, cfg.output)
    todo = work.units
    n_inputs = sum(len(u.items) for u in todo)
    print(f"extract_faces: {len(items)} inputs; {work.n_complete} units already complete, {len(todo)} to do "
          f"({n_inputs} inputs)", flush=True)
    if not todo:
        return {}
    connect(cfg)
    todo, finalize = with_retries(lambda: plan_long_inputs(todo, cfg, clip_s=cfg.clip_s, fps=cfg.fps,
                                                           max_duration_s=cfg.max_duration_s, audio=False),
                                  cfg.retry, cfg.output)
    say_clips("extract_faces", todo, finalize)
    return summarise("extract_faces", run_stages(todo, cfg, load=load_unit, model=FaceExtractor, commit=write_unit,
                                                 id_column="video_id", records_per_call=cfg.records_per_call,
                                                 finalize=finalize), n_inputs, cfg.output)
