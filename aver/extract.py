"""extract_faces: media -> ``faces/`` (one row per sampled frame, primary face track) + ``status/``.

Work is cut into units (one video, or a chunk of images); each unit's rows go to
``faces/<unit>.parquet`` and then its status rows to ``status/<unit>.parquet``, both written
atomically, so a rerun skips exactly the units that completed and never duplicates a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from aver.faces import FaceDetector, FaceDetectorConfig, FaceTracker
from aver.media import InputItem, MediaError, VideoReader, list_inputs, load_image
from aver.outputs import join, status_table, write_table
from aver.storage import redact
from aver.streaming import chunked, prefetch
from aver.units import ActorPoolConfig, actor_device, actor_threads, map_units, pending, stable_chunks

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
    input: str
    """Videos/images: a folder, a glob, a manifest (.txt/.csv/.parquet with `source`) or one file."""
    output: str
    """Output folder (local or fsspec URI); gets faces/ and status/."""
    fps: float = 5.0
    """Frames sampled per second of video (by presentation timestamp)."""
    detector: FaceDetectorConfig = field(default_factory=FaceDetectorConfig)
    """MTCNN and crop settings."""
    images_per_unit: int = 256
    """Images handled (and written) together as one unit of work."""
    max_bytes: int = 20 * 2**30
    """Inputs larger than this get status too_large."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fps <= 0 or self.fps > 120:
            raise ValueError(f"fps must be in (0, 120], got {self.fps}")
        if self.images_per_unit < 1:
            raise ValueError("images_per_unit must be >= 1")


def crop_id(video_id: str, frame_index: int) -> str:
    return f"{video_id}-{frame_index:07d}"


def process_video(item: InputItem, detector: FaceDetector, cfg: ExtractFacesConfig) -> tuple[pa.Table, dict]:
    """All faces rows of one video (primary track; null rows without a face) and its status row."""
    source = redact(item.source)
    status = {"video_id": item.item_id, "source": source, "n_frames": 0, "duration_s": None}
    frames_meta: list[tuple[int, float]] = []
    candidates: list[dict[int, tuple]] = []  # per sampled frame: track id -> (box, prob, jpeg)
    tracker = FaceTracker()
    error = None
    try:
        with VideoReader(item.source, storage_options=cfg.storage_options, max_bytes=cfg.max_bytes) as reader:
            status["duration_s"] = reader.info.duration_s
            frames = prefetch(chunked(reader.frames(cfg.fps), detector.config.batch_size))
            try:
                for chunk in frames:
                    for frame, dets in zip(chunk, detector.detect([f.image for f in chunk])):
                        ids = tracker.update(len(frames_meta), dets)
                        frames_meta.append((frame.index, frame.timestamp_s))
                        candidates.append({tid: (d.box, d.prob, detector.crop(frame.image, d.box))
                                           for tid, d in zip(ids, dets)})
            except MediaError as e:
                if not frames_meta:
                    raise
                error = e  # keep what decoded; the status says where it broke
    except MediaError as e:
        return _faces_table([]), {**status, "status": e.status, "error": str(e)}
    primary = tracker.primary()
    rows = []
    for (index, ts), found in zip(frames_meta, candidates):
        hit = found.get(primary) if primary is not None else None
        rows.append({
            "video_id": item.item_id, "source": source, "crop_id": crop_id(item.item_id, index),
            "frame_index": index, "timestamp_s": ts,
            "track_id": primary if hit else None,
            "box": [float(v) for v in hit[0]] if hit else None,
            "prob": float(hit[1]) if hit else None,
            "crop": hit[2] if hit else None,
        })
    status["n_frames"] = len(rows)
    if status["duration_s"] is None and frames_meta:
        status["duration_s"] = frames_meta[-1][1]
    if error is not None:
        return _faces_table(rows), {**status, "status": error.status, "error": f"{error} (after {len(rows)} frames)"}
    if not rows:
        return _faces_table(rows), {**status, "status": "too_short", "error": "no frame decoded at the sampling rate"}
    if primary is None:
        return _faces_table(rows), {**status, "status": "no_face", "error": None}
    return _faces_table(rows), {**status, "status": "ok", "error": None}


def process_images(items: list[InputItem], detector: FaceDetector, cfg: ExtractFacesConfig) -> tuple[pa.Table, list[dict]]:
    """One row per image (its most confident face, or nulls) and one status row per image."""
    rows, statuses, loaded = [], [], []
    for item in items:
        base = {"video_id": item.item_id, "source": redact(item.source), "duration_s": None}
        try:
            loaded.append((item, load_image(item.source, storage_options=cfg.storage_options)))
        except MediaError as e:
            statuses.append({**base, "status": e.status, "error": str(e), "n_frames": 0})
    detections = detector.detect([img for _, img in loaded]) if loaded else []
    for (item, img), dets in zip(loaded, detections):
        best = dets[0] if dets else None
        rows.append({
            "video_id": item.item_id, "source": redact(item.source), "crop_id": crop_id(item.item_id, 0),
            "frame_index": 0, "timestamp_s": 0.0, "track_id": 0 if best else None,
            "box": [float(v) for v in best.box] if best else None,
            "prob": float(best.prob) if best else None,
            "crop": detector.crop(img, best.box) if best else None,
        })
        statuses.append({"video_id": item.item_id, "source": redact(item.source), "duration_s": None,
                         "n_frames": 1, "status": "ok" if best else "no_face", "error": None})
    return _faces_table(rows), statuses


def _faces_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FACES_SCHEMA)


def plan_units(items: list[InputItem], images_per_unit: int) -> list[dict]:
    """Units of work: each video alone; images in sorted chunks with ids stable for the same input."""
    units = [{"unit_id": i.item_id, "items": [vars(i)]} for i in items if i.kind != "image"]
    images = [i for i in items if i.kind == "image"]
    units += [{"unit_id": uid, "items": [vars(i) for i in images[part]]}
              for uid, part in stable_chunks([i.item_id for i in images], images_per_unit)]
    return units


class FaceExtractor:
    """Ray Data actor: holds one FaceDetector (GPU when given one) and processes whole units."""

    def __init__(self, cfg: ExtractFacesConfig) -> None:
        self.cfg = cfg
        actor_threads(cfg.cpus_per_actor)
        self.detector = FaceDetector(cfg.detector, device=str(actor_device(cfg.gpus_per_actor, "FaceExtractor")))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("unit_id", "video_id", "status", "error")}
        for unit_id, unit_items in zip(batch["unit_id"], batch["items"]):
            items = [InputItem(**dict(i)) for i in unit_items]
            if items[0].kind == "image":
                faces, statuses = process_images(items, self.detector, self.cfg)
            else:
                faces, status = process_video(items[0], self.detector, self.cfg)
                statuses = [status]
            so = self.cfg.storage_options
            write_table(join(self.cfg.output, "faces", f"{unit_id}.parquet"), faces, so)
            write_table(join(self.cfg.output, "status", f"{unit_id}.parquet"), status_table(statuses), so)
            for s in statuses:
                out["unit_id"].append(unit_id)
                out["video_id"].append(s["video_id"])
                out["status"].append(s["status"])
                out["error"].append(s["error"] or "")
        return out


def run(cfg: ExtractFacesConfig) -> dict[str, int]:
    """Run the job on the current Ray cluster (``ray.init()`` starts a local one if none);
    returns the count of each status among the units processed now."""
    items = list_inputs(cfg.input, cfg.storage_options)
    units = plan_units(items, cfg.images_per_unit)
    todo = pending(units, cfg.output, cfg.storage_options)
    print(f"extract_faces: {len(items)} inputs in {len(units)} units; {len(units) - len(todo)} already complete, "
          f"{len(todo)} to do", flush=True)
    counts: dict[str, int] = {}
    if not todo:
        return counts
    for batch in map_units(todo, FaceExtractor, cfg):
        for status, error, vid in zip(batch["status"], batch["error"], batch["video_id"]):
            counts[status] = counts.get(status, 0) + 1
            if status != "ok":
                print(f"  {vid}: {status} {error}", flush=True)
    print("extract_faces: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)
    return counts
