"""Face detection (batched MTCNN), tracks, 140x140 crops, and the one function that turns a video
into tracked face crops (:func:`scan_video`), used by extract_faces, score_videos and fusion alike."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from aver.constants import CROP_SIZE
from aver.faults import MediaError, RetryPolicy, is_transient
from aver.io.media import MAX_DURATION_S, ClipRange, VideoFrame, VideoReader
from aver.io.streaming import prefetch
from aver.tracking import FaceTracker, TrackerConfig, colour_histogram, histogram_distance

if TYPE_CHECKING:
    import torch


@dataclass
class FaceDetectorConfig:
    image_size: int = CROP_SIZE
    """Side of the square face crop (the paper's 140 px)."""
    margin: float = 0.2
    """Extra context around the detected box, as a fraction of its larger side."""
    min_face_size: int = 20
    """Smallest face MTCNN looks for, in pixels of the detection image."""
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    """P-, R-, O-net score thresholds (facenet-pytorch defaults)."""
    min_prob: float = 0.7
    """Detections below this final probability are dropped (MTCNN's own last threshold); those below
    the tracker's ``high_prob`` only extend face tracks (:class:`aver.tracking.TrackerConfig`)."""
    detect_max_side: int = 640
    """Frames whose longer side exceeds this are downscaled for detection; boxes are mapped back."""
    batch_size: int = 32
    """Frames per MTCNN call."""
    jpeg_quality: int = 90
    """Quality of the stored JPEG crops."""

    def __post_init__(self) -> None:
        self.thresholds = tuple(float(t) for t in self.thresholds)
        if self.image_size < 16 or self.min_face_size < 12 or self.detect_max_side < 64 or self.batch_size < 1:
            raise ValueError("FaceDetectorConfig: image_size >= 16, min_face_size >= 12, detect_max_side >= 64, "
                             "batch_size >= 1")
        if not 0 <= self.margin <= 2 or not 0 <= self.min_prob <= 1 or len(self.thresholds) != 3:
            raise ValueError("FaceDetectorConfig: margin in [0, 2], min_prob in [0, 1], three thresholds")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("FaceDetectorConfig.jpeg_quality must be in [1, 100]")


@dataclass
class Detection:
    box: np.ndarray
    """x1, y1, x2, y2 in source-frame pixels."""
    prob: float
    identity: np.ndarray | None = None
    """The face's identity embedding, when an identity model ran (links tracks across cuts)."""


class FaceDetector:
    """MTCNN (facenet-pytorch's networks and weights, batched on the device: :class:`aver.models.mtcnn.MTCNN`)
    and the face crops, both on one device, for frames that upstream's wrapper does not take:
    frames without faces inside a batch, frames of different sizes, large frames (detected on a
    downscaled copy). Input frames are HxWx3 uint8 RGB (grayscale and RGBA are converted). On a
    GPU, the next batch of frames is copied to the device while the current one is detected."""

    def __init__(self, config: FaceDetectorConfig | None = None, device: str | torch.device | None = None) -> None:
        import torch  # here, not at the top: the CPU tasks that decode frames never load torch

        from aver.models.mtcnn import MTCNN

        self.config = config or FaceDetectorConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mtcnn = MTCNN(self.config.min_face_size, self.config.thresholds).to(self.device)

    def detect(self, frames: list[np.ndarray], views: list[tuple[np.ndarray, float]] | None = None
               ) -> list[list[Detection]]:
        """Detections for each frame (possibly empty), best first. Frames may be RGB, grayscale
        (HxW or HxWx1) or RGBA; any of them of any size, in one call. ``views`` are the frames'
        :func:`detection_view` when the decoding stage made them already (the CPU work leaves the
        model's process); boxes are in the frames' pixels either way. One host transfer per batch
        of ``batch_size`` views: the boxes and probabilities."""
        import torch

        if views is None:
            views = [detection_view(f, self.config) for f in frames]
        results: list[list[Detection]] = [[] for _ in frames]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (small, _) in enumerate(views):
            # MTCNN's image pyramid is empty below its smallest face: such a frame has no face to find
            if min(small.shape[:2]) >= self.config.min_face_size:
                by_shape.setdefault(small.shape[:2], []).append(i)
        cfg = self.config
        chunks = [indices[s:s + cfg.batch_size] for indices in by_shape.values()
                  for s in range(0, len(indices), cfg.batch_size)]
        batches = self._uploads(np.stack([views[i][0] for i in chunk]) for chunk in chunks)
        for chunk, batch in zip(chunks, batches):
            boxes, probs, index = self.mtcnn(batch.permute(0, 3, 1, 2))
            found = torch.cat([boxes, probs[:, None], index[:, None].to(boxes.dtype)], dim=1).cpu().numpy()
            for k, i in enumerate(chunk):
                rows = found[found[:, 5] == k].astype(np.float64)
                scale = views[i][1]
                dets = [Detection(row[:4] / scale, float(row[4])) for row in rows if row[4] >= cfg.min_prob]
                results[i] = sorted(dets, key=lambda d: -d.prob)
        return results

    def crops(self, frames: list[np.ndarray], boxes: list[list[np.ndarray]]) -> torch.Tensor:
        """The configured crops (:func:`crop_face`, cut and resized in torch on the detector's
        device) of each frame's ``boxes``, frame by frame: uint8 ``[K,3,S,S]`` on the device."""
        import torch

        from aver.models._base import resize_faces

        size, out = self.config.image_size, []
        wanted = [(f, b) for f, b in zip(frames, boxes) if len(b)]
        for (_, frame_boxes), image in zip(wanted, self._uploads(_as_rgb(f) for f, _ in wanted)):
            image = image.permute(2, 0, 1)
            h, w = image.shape[1:]
            for box in frame_boxes:
                x1, y1, x2, y2 = _crop_region(box, self.config.margin)
                face = image.new_zeros((3, max(1, y2 - y1), max(1, x2 - x1)))  # outside the frame: black
                cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
                if cx2 > cx1 and cy2 > cy1:
                    face[:, cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1] = image[:, cy1:cy2, cx1:cx2]
                out.append(resize_faces(face[None], size))
        return torch.cat(out) if out else torch.zeros((0, 3, size, size), dtype=torch.uint8, device=self.device)

    def encode(self, crops: torch.Tensor, quality: int | None = None) -> list[bytes]:
        """``[K,3,H,W]`` uint8 crops as JPEG (``torchvision.io.encode_jpeg``: nvJPEG on a GPU,
        libjpeg-turbo on the CPU), with one host transfer for all of them."""
        import torch
        from torchvision.io import encode_jpeg

        if not len(crops):
            return []
        coded = encode_jpeg(list(crops.contiguous().unbind(0)), quality=quality or self.config.jpeg_quality)
        ends = np.cumsum([0] + [len(c) for c in coded])
        flat = torch.cat(coded).cpu().numpy()
        return [flat[a:b].tobytes() for a, b in zip(ends[:-1], ends[1:])]

    def crop(self, frame: np.ndarray, box: np.ndarray) -> bytes:
        """The configured crop of ``box`` as JPEG bytes (what extract_faces stores)."""
        return self.encode(self.crops([frame], [[box]]))[0]

    def _uploads(self, arrays: Iterable[np.ndarray]) -> Iterator[torch.Tensor]:
        """Host arrays -> tensors on the device, in order. On a GPU a thread stacks and pins the
        next one and copies it on a side stream while the current one is computed; on the CPU they
        are the arrays themselves."""
        import torch

        if self.device.type != "cuda":
            yield from map(_tensor, arrays)
            return
        copier = torch.cuda.Stream(self.device)

        def send(a: np.ndarray):
            host = _tensor(a).pin_memory()
            with torch.cuda.stream(copier):
                on_device = host.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copier)
            return on_device, done

        for on_device, done in prefetch(map(send, arrays), depth=1):
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            on_device.record_stream(current)  # its memory is not reused before the detection ends
            yield on_device


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory, read-only arrays included (frames are views of Ray's object
    store, which nothing here writes to)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def _crop_region(box, margin: float) -> tuple[int, int, int, int]:
    """The square (x1, y1, x2, y2 integer pixels) around ``box`` enlarged by ``margin`` of its larger side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return tuple(int(round(v)) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))


def detection_view(frame: np.ndarray, config: FaceDetectorConfig) -> tuple[np.ndarray, float]:
    """``frame`` as MTCNN sees it (RGB, downscaled to ``config.detect_max_side``) and the scale
    from frame pixels to view pixels."""
    frame = _as_rgb(frame)
    h, w = frame.shape[:2]
    # the longer side down to detect_max_side, but the shorter one never below four smallest faces:
    # a 2000x40 strip scaled to 640 px would be 13 px tall, smaller than any face MTCNN finds
    keep = 4 * config.min_face_size
    scale = min(1.0, max(config.detect_max_side / max(h, w), keep / max(1, min(h, w))))
    if scale >= 1.0:
        return np.ascontiguousarray(frame), 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR)), size[0] / w


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    # MTCNN needs HxWx3 uint8 RGB; OpenCV-style BGR cannot be told apart and stays the caller's duty.
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
        raise ValueError(f"frames must be HxW, HxWx1, HxWx3 or HxWx4, got {frame.shape}")
    if frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    if frame.shape[2] == 4:
        alpha = frame[..., 3:4].astype(np.float32) / 255.0
        return (frame[..., :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return frame


def crop_face(image: np.ndarray, box, *, size: int = CROP_SIZE, margin: float = 0.2) -> np.ndarray:
    """A square ``size`` x ``size`` RGB crop around ``box`` (x1, y1, x2, y2 pixels) enlarged by
    ``margin`` of its larger side; parts outside the image are black (never stretched, so faces on
    the edge of non-square frames keep their proportions). PIL on the host, for the CPU stages;
    :meth:`FaceDetector.crops` cuts the same crops on the model's device."""
    region = _crop_region(box, margin)
    return np.asarray(Image.fromarray(_as_rgb(image)).crop(region).resize((size, size), Image.BILINEAR))


@dataclass
class TrackedFrame:
    """One sampled frame: where it is, and its faces as (track id, detection, crop: JPEG bytes or array)."""

    step: int
    """Sampled-frame number in the video (0, 1, ...)."""
    index: int
    """Frame index in the stream."""
    timestamp_s: float
    """Presentation time."""
    faces: list[tuple[int, Detection, bytes | np.ndarray]]
    """The faces a track took (a low-confidence detection no track took is left out)."""
    cut: bool = False
    """A shot cut comes before this frame."""


@dataclass
class VideoScan:
    """What :func:`scan_video` saw of one video."""

    tracker: FaceTracker
    """The tracks and shot cuts; ``tracker.people()`` links them, ``tracker.primary()`` is the primary person."""
    n_frames: int
    """Frames sampled."""
    decoded_s: float
    """Seconds really decoded."""
    broken: MediaError | None
    """The content error that stopped a stream broken midway (what came before is kept); None if whole."""


@dataclass
class Decoded:
    """What decoding saw of one video, filled in as :func:`frame_segments` goes."""

    n_frames: int = 0
    """Frames sampled (and handed on)."""
    decoded_s: float = 0.0
    """Seconds really decoded."""
    broken: MediaError | None = None
    """The content error that stopped a stream broken midway (what came before is kept); None if whole."""
    ends_early: bool = False
    """Reading a clip: the stream ended before the clip did (a header that claims more than there
    is), so the clips after it hold nothing."""

    @property
    def ends_input(self) -> bool:
        """Nothing after this clip is to be read: its stream broke, or ended."""
        return self.broken is not None or self.ends_early

    def then(self, later: "Decoded | None") -> "Decoded":
        """What decoding saw of this clip and the ``later`` one (None: nothing more)."""
        if later is None:
            return self
        return Decoded(self.n_frames + later.n_frames, max(self.decoded_s, later.decoded_s), self.broken or later.broken)


def _fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                    Image.BILINEAR))


def frame_segments(source: str, decoded: Decoded, *, fps: float, detector: FaceDetectorConfig,
                   retry: RetryPolicy | None = None, max_side: int | None = None,
                   storage_options: dict | None = None, max_bytes: int = 20 * 2**30,
                   max_duration_s: float = MAX_DURATION_S,
                   cut_distance: float = TrackerConfig.cut_distance,
                   clip: ClipRange | None = None, threads: int = 0) -> Iterator[list[VideoFrame]]:
    """The frames of ``source`` sampled at ``fps``, ``detector.batch_size`` at a time, each at most
    ``max_side`` pixels on its longer side, with its :func:`detection_view` and whether a shot cut
    comes before it (colour-histogram distance to the previous sampled frame >= ``cut_distance``). A storage fault
    midway is retried as ``retry`` says by reading the video again and skipping the frames already
    handed on; a stream broken midway ends with the last whole segment (``decoded.broken``; one broken in its first segment raises ``corrupt``);
    one that decodes no frame raises ``too_short``. With ``clip``, only that time range (a clip after
    the first one is midway: a break in it, or no frame at all, is no error of the input's; the
    first frame's cut is decided by the clip before it, whose last frame this one has not seen).
    ``threads``: FFmpeg's decoding threads (0: its own choice)."""
    retry = retry or RetryPolicy(attempts=1)
    attempt, previous = 0, None  # the colour histogram of the last frame handed on
    midway = clip is not None and clip.start_s > 0
    while True:
        try:
            with VideoReader(source, storage_options=storage_options, max_bytes=max_bytes,
                             max_duration_s=max_duration_s, threads=threads) as reader:
                skip, chunk = decoded.n_frames, []
                try:
                    for frame in reader.frames(fps, clip):
                        if skip:
                            skip -= 1
                            continue
                        if previous is None and reader.before is not None:
                            previous = colour_histogram(detection_view(_fit(reader.before, max_side), detector)[0])
                        image = _fit(frame.image, max_side)
                        view = detection_view(image, detector)
                        hist = colour_histogram(view[0])
                        cut = histogram_distance(previous, hist) >= cut_distance
                        chunk.append(VideoFrame(frame.index, frame.timestamp_s, image, view, cut))
                        previous = hist
                        if len(chunk) == detector.batch_size:
                            decoded.n_frames += len(chunk)
                            yield chunk
                            chunk = []
                except MediaError as e:  # broken midway: keep the segments handed on, drop the partial one
                    if (not decoded.n_frames and not midway) or e.status != "corrupt":
                        raise
                    decoded.broken, chunk = e, []
                decoded.n_frames += len(chunk)
                decoded.decoded_s = reader.decoded_s
                decoded.ends_early = clip is not None and clip.end_s is not None and reader.ended
                if chunk:
                    yield chunk
            break
        except Exception as e:  # noqa: BLE001 - only storage faults are tried again
            if not is_transient(e) or attempt == retry.attempts - 1:
                raise
            time.sleep(retry.delay(attempt))
            attempt += 1
    if not decoded.n_frames and not midway:
        raise MediaError("too_short", "no frame decoded at the sampling rate")


def detect_frames(detector: FaceDetector, frames: list[VideoFrame]) -> tuple[list[list[Detection]], torch.Tensor]:
    """Each frame's detections, best first, and their crops in that order (frame by frame), uint8
    ``[K,3,S,S]`` on the detector's device: the model stage encodes them or runs its networks on
    them there."""
    images = [f.image for f in frames]
    views = [f.view for f in frames] if all(f.view is not None for f in frames) else None
    found = detector.detect(images, views)
    return found, detector.crops(images, [[d.box for d in dets] for dets in found])


def with_crops(found: list[list[Detection]], crops: list) -> list[list[tuple[Detection, object]]]:
    """Each frame's faces as (detection, its crop), ``crops`` given in :func:`detect_frames`' order."""
    out, k = [], 0
    for dets in found:
        out.append([(d, crops[k + i]) for i, d in enumerate(dets)])
        k += len(dets)
    return out


def track_frames(tracker: FaceTracker, frames: Iterable[tuple[int, float, bool, list[tuple[Detection, object]]]],
                 start: int = 0) -> list[TrackedFrame]:
    """Link detected frames, given in order as (frame index, time, shot cut before it, [(detection,
    crop)]) from sampled-frame number ``start`` on, into ``tracker``'s tracks."""
    done = []
    for step, (index, timestamp_s, cut, faces) in enumerate(frames, start):
        dets = [d for d, _ in faces]
        identities = [d.identity for d in dets] if any(d.identity is not None for d in dets) else None
        ids = tracker.update(step, dets, cut=cut, identities=identities)
        done.append(TrackedFrame(step, index, timestamp_s,
                                 [(tid, d, c) for tid, (d, c) in zip(ids, faces) if tid is not None], cut))
    return done


def scan_video(source: str, detector: FaceDetector, on_frames: Callable[[list[TrackedFrame]], None], *,
               fps: float, storage_options: dict | None = None, max_bytes: int = 20 * 2**30,
               max_duration_s: float = MAX_DURATION_S, jpeg: bool = True,
               tracking: TrackerConfig | None = None) -> VideoScan:
    """Decode ``source`` at ``fps``, detect faces batch by batch and link them into tracks, in one
    process (fusion featurising); each batch of tracked frames goes to ``on_frames`` as it is done,
    so no video is ever held whole. Crops are JPEG bytes or, with ``jpeg=False``, arrays for a
    model that uses them at once. The batch jobs run the same steps as Ray Data stages."""
    tracker, decoded, n = FaceTracker(tracking or TrackerConfig()), Decoded(), 0
    for chunk in prefetch(frame_segments(source, decoded, fps=fps, detector=detector.config,
                                         storage_options=storage_options, max_bytes=max_bytes,
                                         max_duration_s=max_duration_s, cut_distance=tracker.config.cut_distance)):
        found, crops = detect_frames(detector, chunk)
        crops = detector.encode(crops) if jpeg else list(crops.permute(0, 2, 3, 1).cpu().numpy())
        found = with_crops(found, crops)
        on_frames(track_frames(tracker, ((f.index, f.timestamp_s, f.cut, faces) for f, faces in zip(chunk, found)), n))
        n += len(chunk)
    return VideoScan(tracker, decoded.n_frames, decoded.decoded_s, decoded.broken)
