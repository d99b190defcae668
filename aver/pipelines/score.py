"""score_videos: a media archive -> per-time-step arousal/valence and expression probabilities.

One unit of work per input file (a video longer than ``clip_s``: a unit per clip, and its audio one
more, committed together by one task once all are in), in three stages: a CPU task decodes frames at ``fps`` (segment
by segment, so no video is ever held whole; shot cuts found on the way) and the audio's log-mel;
model actors run MTCNN, the student (embeddings and 8-class probabilities per face crop), the
identity network when given, and VGGish (frame features, in bounded chunks); a write task links the
faces into tracks and the tracks into people (:mod:`aver.tracking`) and runs the fusion model over
sliding windows.

Each step of ``hop_s`` gets, from the window of ``window_s`` ending there, one row per scored person
on screen in that step (the primary person, or everyone with ``all_faces``; ``track_id`` is the
person) and one row of the soundtrack (``track_id`` null) when there is audio. A person's row fuses
the face with the voice (``audio+visual``) or has the face alone (``visual``: no audio); the
soundtrack's row is ``audio`` (``none``, null scores, where the window has no audio; an input with
neither faces nor audio gets no rows).

Per input, written atomically in this order: ``scores/<id>.parquet``, ``tracks/<id>.parquet``,
``summary/<id>.parquet``, ``report/<id>.png``, then ``status/<id>.parquet`` (its presence means
"complete"). The run ends by rebuilding ``report/`` (index, pages, circumplex) from ``status/`` and
``summary/`` when they changed.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from aver.constants import AFFECTNET_CLASSES, SAMPLE_RATE
from aver.constants import AUDIO_STEP_S
from aver.data.features import (AUDIO_DIM, VISUAL_DIM, AudioTimeline, MelChunk, centred, in_span, mel_chunks,
                                student_features, take, window_shape)
from aver.data.recola import SessionWindows
from aver.faces import (Decoded, Detection, FaceDetector, FaceDetectorConfig, detect_frames, frame_segments, track_frames,
                        with_crops)
from aver.faults import MediaError, verdict, with_retries
from aver.io.media import (FRAME_MAX_SIDE, MAX_DURATION_S, InputItem, VideoFrame, audio_chunks, decode_threads,
                           list_inputs)
from aver.io.streaming import first_and_rest
from aver.io.parts import join
from aver.io.storage import absolute, redact
from aver.models import IdentityNet, autocast, load_checkpoint, resize_faces
from aver.models.weights import ship
from aver.pipelines.report import SCORES_SCHEMA, SUMMARY_SCHEMA, TRACKS_SCHEMA, build_report, timeline_png
from aver.pipelines.cluster import actor_setup, connect
from aver.pipelines.ledger import Unit, commit, plan, status_row
from aver.pipelines.stages import (CLIP_S, ActorPoolConfig, ModelStage, Record, Records, check_clip_s,
                                   plan_long_inputs, run_stages, say_clips, summarise)
from aver.tracking import TRACKING_VERSION, FaceTracker, TrackerConfig

SCORING_VERSION = TRACKING_VERSION
"""What a row of scores/ means; recorded in status/, summary/ and ``OUTPUT/VERSION``. 1: a row per
face track fragment and step, the soundtrack copied under each; 2: rows of people where they are on
screen, the soundtrack its own series."""

MODEL_FILES = {"student": "student.pt", "vggish_arousal": "vggish_arousal.pt", "vggish_valence": "vggish_valence.pt",
               "fused": "fusion.pt", "visual": "fusion_visual.pt", "audio": "fusion_audio.pt"}


@dataclass
class ScoreVideosConfig(ActorPoolConfig):
    uri_fields = ("input", "output", "model")

    input: str
    """Videos and audio files: a folder, a glob, a manifest (.txt/.csv/.parquet) or one file."""
    output: str
    """Output folder (local or fsspec URI); gets scores/, summary/, status/ and report/."""
    model: str
    """Folder of checkpoints as `make demo` leaves them: student.pt, vggish_{arousal,valence}.pt,
    fusion.pt (fusion_visual.pt and fusion_audio.pt used for one-modality rows when present)."""
    fps: float = SessionWindows.fps
    """Frames sampled per second for faces (as the fusion model was trained)."""
    window_s: float = SessionWindows.window_s
    """Fusion window (as trained); the first steps use the shorter span available."""
    hop_s: float = SessionWindows.hop_s
    """One score row per track every hop_s seconds, for the window ending there."""
    all_faces: bool = False
    """Score every person; default only the primary one (on screen longest and largest)."""
    detector: FaceDetectorConfig = field(default_factory=FaceDetectorConfig)
    """MTCNN and crop settings."""
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    """How detections become face tracks and tracks become people."""
    identity_model: str | None = None
    """Identity network that links a person's tracks across long misses and shot cuts: registry name
    facenet-vggface2 or a facenet-pytorch InceptionResnetV1 state dict (path or URI); without it
    tracks link by motion only."""
    batch_size: int = 64
    """Face crops per student batch and windows per fusion batch."""
    report_page_size: int = 200
    """Inputs per report page (the index lists every input and links to its page)."""
    max_bytes: int = 20 * 2**30
    """Inputs larger than this get status too_large."""
    max_duration_s: float = MAX_DURATION_S
    """Inputs that decode longer than this get status too_large."""
    frame_max_side: int = FRAME_MAX_SIDE
    """Sampled frames larger than this on their longer side are downscaled where they are decoded."""
    clip_s: float = CLIP_S
    """Videos longer than this (by their headers) are read as clips of this length on any nodes at
    once (their audio as one more), and resumed clip by clip; 0: every input read whole by one task."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.detector, dict):
            self.detector = FaceDetectorConfig(**self.detector)
        if isinstance(self.tracker, dict):
            self.tracker = TrackerConfig(**self.tracker)
        if not 0 < self.fps <= 120:
            raise ValueError(f"fps must be in (0, 120], got {self.fps}")
        check_clip_s(self.clip_s, self.fps)
        if self.window_s <= 0 or self.hop_s <= 0 or self.hop_s > self.window_s:
            raise ValueError("need window_s > 0 and 0 < hop_s <= window_s")
        if self.batch_size < 1 or self.report_page_size < 1:
            raise ValueError("batch_size and report_page_size must be >= 1")

    def storage_uris(self) -> list[tuple[str, str]]:
        return super().storage_uris() + ([("identity_model", self.identity_model)] if self.identity_model else [])


THUMBNAIL = 64
"""Side of the face thumbnails the model stage keeps (a person's picture in tracks/)."""


@dataclass
class FaceOut:
    """What the model stage makes of one face."""

    embedding: np.ndarray
    """The student's embedding, float16 [1920]."""
    probs: np.ndarray
    """Its 8 expression probabilities."""
    thumbnail: bytes
    """A small JPEG of the crop."""


@dataclass(kw_only=True)
class ScoreRecord(Record):
    """score_videos' record: a segment of a video's frames, a stretch of its audio's log-mel, or its
    last record (what decoding saw of both)."""

    frames: list[VideoFrame] | None = None
    """A segment's sampled frames (model input)."""
    detected: list[tuple[int, float, bool, list[tuple[Detection, FaceOut]]]] | None = None
    """A segment's frames as (frame index, time, shot cut before it, [(detection, its model outputs)])."""
    mel: MelChunk | None = None
    """A stretch of the audio's log-mel with its context (model input)."""
    audio: np.ndarray | None = None
    """That stretch's VGGish frame features ``[steps, 256]`` (arousal network's, then valence's)."""
    decoded: Decoded | None = None
    """On the last record: what decoding saw of the video (None: no usable video)."""
    video_error: MediaError | None = None
    """On the last record: what stopped the video, if anything."""
    audio_s: float = 0.0
    """On the last record: seconds of audio decoded."""
    audio_error: MediaError | None = None
    """On the last record: what stopped the audio, if anything (its stretches are then not used)."""


def load_unit(unit: Unit, cfg: ScoreVideosConfig) -> Iterator[ScoreRecord]:
    """Load stage (CPU task): a video's sampled frames in segments of ``detector.batch_size``, then
    its audio's log-mel in stretches of :data:`MEL_CHUNK` frames (decoded as it goes), then a last
    record with what decoding saw and the verdict that stopped either modality, if any. A clip of a
    long video reads its time range of the video only; the audio of the whole input is a clip of its own."""
    item = InputItem(**unit.items[0])
    item.check()
    clip = unit.clip
    last = ScoreRecord(unit=unit)
    if clip is None or clip.range is not None:
        if item.kind != "audio":
            yield from _video_part(unit, item, cfg, last)
        if clip is not None:  # a video clip: its audio is read with the input's audio clip
            last.ends_input = last.decoded is not None and last.decoded.ends_input
            yield last
            return
    if not (last.video_error is not None and last.video_error.status in ("corrupt", "too_large") and last.decoded is None):
        yield from _audio_part(unit, item, cfg, last)
    yield last


def _video_part(unit: Unit, item: InputItem, cfg: ScoreVideosConfig, last: ScoreRecord) -> Iterator[ScoreRecord]:
    """The video's frames in segments; ``last`` learns what decoding saw and what stopped it."""
    decoded = Decoded()
    try:
        for frames in frame_segments(item.source, decoded, fps=cfg.fps, detector=cfg.detector,
                                     retry=cfg.retry, max_side=cfg.frame_max_side,
                                     storage_options=cfg.storage_options, max_bytes=cfg.max_bytes,
                                     max_duration_s=cfg.max_duration_s, cut_distance=cfg.tracker.cut_distance,
                                     clip=unit.clip and unit.clip.range,
                                     threads=decode_threads(cfg.cpus_per_task)):
            yield ScoreRecord(unit=unit, frames=frames)
        last.decoded, last.video_error = decoded, decoded.broken
    except MediaError as e:  # no usable video: what was handed on is dropped, the audio may score
        last.decoded, last.video_error = None, e


def _audio_part(unit: Unit, item: InputItem, cfg: ScoreVideosConfig, last: ScoreRecord) -> Iterator[ScoreRecord]:
    """The audio's log-mel in stretches; ``last`` learns how long it ran and what stopped it."""
    samples = 0

    def waves() -> Iterator[np.ndarray]:
        nonlocal samples
        for wave in audio_chunks(item.source, storage_options=cfg.storage_options or None,
                                 max_duration_s=cfg.max_duration_s):
            samples += len(wave)
            yield wave

    try:  # a storage fault before the first stretch is retried; one later stops the audio
        chunks = with_retries(lambda: first_and_rest(mel_chunks(waves(), MEL_CHUNK)), cfg.retry, item.source)
        n = 0
        for chunk in chunks:
            n += chunk.steps
            yield ScoreRecord(unit=unit, mel=chunk)
        last.audio_s = samples / SAMPLE_RATE
        if not n:
            last.audio_error = MediaError("too_short", "audio shorter than one VGGish step")
    except MediaError as e:
        last.audio_error = e


MEL_CHUNK = 1024
"""Log-mel frames per audio record (41 s): what VGGish holds at once, bounded however long the
recording. A VGGish pass over a chunk holds ~70 MB per 1000 frames (CPU), so 4096 frames (164 s) held
~275 MB in the actor where 1024 hold ~80 MB, for ~9% more VGGish work (the 64 frames of context on
each side of a chunk), small beside the student's on every face (docs/decisions.md, "Long media")."""


class VideoScorer(ModelStage):
    """Model stage (Ray Data actor): MTCNN, the student, the identity network (when given) and both
    VGGish networks on one device. The frames of several segments are detected and their faces
    embedded together; each stretch of log-mel goes through both VGGish networks."""

    consumed = ("frames", "mel")

    def __init__(self, cfg: ScoreVideosConfig) -> None:
        self.cfg = cfg
        so = cfg.storage_options or None
        self.device = actor_setup(cfg, "score_videos VideoScorer")
        self.models: dict[str, torch.nn.Module] = {}
        for key in ("student", "vggish_arousal", "vggish_valence"):
            model, _ = load_checkpoint(join(cfg.model, MODEL_FILES[key]), storage_options=so)
            self.models[key] = model.to(self.device, memory_format=torch.channels_last).eval()
        self.detector = FaceDetector(cfg.detector, device=str(self.device))
        self.identity = None
        if cfg.identity_model:
            self.identity = IdentityNet.from_weights(cfg.identity_model, storage_options=so).to(self.device)
        self.autocast = autocast(self.device)

    @torch.inference_mode()
    def run(self, records: list[ScoreRecord]) -> None:
        segments = [r for r in records if r.frames]
        frames = [f for r in segments for f in r.frames]
        found, crops = detect_frames(self.detector, frames) if frames else ([], None)
        n, ident = sum(len(d) for d in found), None
        if n:
            with self.autocast:
                emb, prob = student_features(self.models["student"], crops, self.cfg.batch_size, self.device)
            # identities in float32 (no autocast): linking compares them against a threshold
            ident = self.identity.embed(crops, self.cfg.batch_size) if self.identity is not None else None
            thumbnails = self.detector.encode(resize_faces(crops, THUMBNAIL), quality=85)
        embedded = []
        for faces in with_crops(found, range(n)):
            out = []
            for d, i in faces:
                if ident is not None:
                    d.identity = ident[i]
                out.append((d, FaceOut(emb[i].astype(np.float16), prob[i], thumbnails[i])))
            embedded.append(out)
        start = 0
        for r in segments:
            n = len(r.frames)
            r.detected = [(f.index, f.timestamp_s, f.cut, faces)
                          for f, faces in zip(r.frames, embedded[start:start + n])]
            start += n
        for r in records:
            if r.mel is not None:
                mel = torch.tensor(r.mel.mel)[None, None].to(self.device)  # a read-only view of the block
                with self.autocast:
                    parts = [self.models[k].frame_features(mel).float().cpu().numpy()[0]
                             for k in ("vggish_arousal", "vggish_valence")]
                r.audio = np.concatenate([p[r.mel.skip:r.mel.skip + r.mel.steps] for p in parts], axis=1)


_FUSION: dict[tuple[str, str], torch.nn.Module] = {}
"""Fusion models loaded by this worker process, by (model folder, key): commit tasks reuse them."""


def _fusion_models(cfg: ScoreVideosConfig) -> dict[str, torch.nn.Module]:
    from aver.io.storage import exists

    so = cfg.storage_options or None
    found = {}
    for key in ("fused", "visual", "audio"):
        if (cfg.model, key) not in _FUSION:
            uri = join(cfg.model, MODEL_FILES[key])
            if key != "fused" and not exists(uri, so):
                continue  # one-modality rows fall back to the fused model with that input zeroed
            _FUSION[cfg.model, key] = load_checkpoint(uri, storage_options=so)[0].eval()
        found[key] = _FUSION[cfg.model, key]
    return found


def write_unit(unit: Unit, records: Records, cfg: ScoreVideosConfig) -> list[dict]:
    """Commit: the input's faces linked into tracks and people, the fusion windows scored in batches
    as they are cut (on this task's CPU: the fusion model is small beside the others), then scores/,
    tracks/, summary/, the timeline PNG and last the status row."""
    item = InputItem(**unit.items[0])
    status = status_row("video_id", item.item_id, redact(item.source))
    status["scoring_version"] = SCORING_VERSION
    parts, files = {}, {}
    try:
        parts, files = _score(item, records, status, cfg)
    except Exception as e:  # noqa: BLE001 - whatever one input raises ends in its status row
        status["status"], status["error"] = verdict(e, item.source)
        parts, files = {}, {}
    commit(cfg.output, unit, parts, [status], id_column="video_id", storage_options=cfg.storage_options,
           policy=cfg.retry, files=files)
    return [status]


class _Unusable(Exception):
    """A unit's failure record, raised through to its status row."""

    def __init__(self, failure: tuple[str, str]) -> None:
        super().__init__(failure[1])
        self.failure = failure


@dataclass
class People:
    """What the first pass over a video's segments learns: enough to score it in the second."""

    n_frames: int = 0
    """Sampled frames."""
    n_tracks: int = 0
    """Face tracks linked by motion (before people)."""
    of: dict[int, int] = field(default_factory=dict)
    """Track id -> person id (tracks too short to be a person are left out)."""
    counts: dict[int, int] = field(default_factory=dict)
    """Person -> frames with their face."""
    sums: dict[int, np.ndarray] = field(default_factory=dict)
    """Person -> float64 sum of their embeddings (for the per-recording centring)."""
    spans: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    """Person -> (first, last time) of each of their tracks: where they are on screen."""
    pictures: dict[int, tuple[float, bytes]] = field(default_factory=dict)
    """Person -> (probability x box area, thumbnail) of their largest, surest face."""
    primary: int | None = None
    """The primary person (on screen longest and largest), None without faces."""
    cuts: list[float] = field(default_factory=list)
    """Times of the shot cuts."""
    decoded_s: float = 0.0

    def mean(self, person: int) -> np.ndarray:
        return (self.sums[person] / self.counts[person]).astype(np.float32)

    def on_screen(self, person: int, start: float, end: float) -> bool:
        """Whether ``person`` is on screen in the step [start, end) (a track's short misses bridged)."""
        return any(first < end and last >= start for first, last in self.spans[person])


def _first_pass(records: Records, cfg: ScoreVideosConfig) -> tuple[People, AudioTimeline | None, ScoreRecord]:
    """People (tracks linked, embeddings summed per track, then per person), the audio timeline
    (small: 256 values per 0.32 s) and the last record, one segment at a time."""
    tracker, people, audio, last = FaceTracker(cfg.tracker), People(), [], None
    counts: dict[int, int] = {}
    sums: dict[int, np.ndarray] = {}
    spans: dict[int, tuple[float, float]] = {}
    pictures: dict[int, tuple[float, bytes]] = {}
    for r in records():
        if r.failure:
            raise _Unusable(r.failure)
        for frame in track_frames(tracker, r.detected or (), people.n_frames):
            people.n_frames += 1
            if frame.cut:
                people.cuts.append(frame.timestamp_s)
            for tid, d, out in frame.faces:
                counts[tid] = counts.get(tid, 0) + 1
                sums[tid] = sums.get(tid, 0.0) + out.embedding.astype(np.float64)
                spans[tid] = (spans.get(tid, (frame.timestamp_s,))[0], frame.timestamp_s)
                weight = d.prob * float((d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
                if tid not in pictures or weight > pictures[tid][0]:
                    pictures[tid] = (weight, out.thumbnail)
        if r.audio is not None and not _video_unusable(last):
            audio.append(r.audio)
        if r.last:
            last = _ended(last, r)
    if _video_unusable(last):  # as a whole read, which never decodes the audio of such an input
        audio, last.audio_s, last.audio_error = [], 0.0, None
    people.of, people.n_tracks = tracker.people(), len(tracker.tracks)
    for tid, pid in people.of.items():
        people.counts[pid] = people.counts.get(pid, 0) + counts[tid]
        people.sums[pid] = people.sums.get(pid, 0.0) + sums[tid]
        people.spans.setdefault(pid, []).append(spans[tid])
        if pid not in people.pictures or pictures[tid][0] > people.pictures[pid][0]:
            people.pictures[pid] = pictures[tid]
    people.primary = tracker.primary(people.of)
    if last.audio_error is not None or not audio:
        return people, None, last
    feats = np.concatenate(audio).astype(np.float32)
    return people, AudioTimeline(np.arange(len(feats)) * AUDIO_STEP_S, feats), last


def _ended(ending: ScoreRecord | None, r: ScoreRecord) -> ScoreRecord:
    """What the last records of an input's clips say together (one record: itself): decoding seen
    over the video clips in order, the audio from the audio clip."""
    if ending is None:
        return copy.copy(r)
    if r.unit.clip is not None and r.unit.clip.range is None:
        ending.audio_s, ending.audio_error = r.audio_s, r.audio_error
        return ending
    both = ending.decoded is not None and r.decoded is not None
    ending.decoded = ending.decoded.then(r.decoded) if both else None
    ending.video_error = ending.video_error or r.video_error
    return ending


def _video_unusable(last: ScoreRecord | None) -> bool:
    return (last is not None and last.decoded is None and last.video_error is not None
            and last.video_error.status in ("corrupt", "too_large"))


def _score(item: InputItem, records: Records, status: dict, cfg: ScoreVideosConfig) -> tuple[dict, dict]:
    """Score one input: fills ``status`` and returns its output parts and report files; a content
    verdict about one modality leaves the other to score."""
    try:
        people, audio, last = _first_pass(records, cfg)
    except _Unusable as e:
        status["status"], status["error"] = e.failure
        return {}, {}
    video_error, audio_error = last.video_error, last.audio_error
    if last.decoded is None:
        people = None
    else:
        people.decoded_s = last.decoded.decoded_s
    video_s = people.decoded_s if people is not None else 0.0
    status["duration_s"] = round(max(video_s, last.audio_s), 6)
    status["n_frames"] = people.n_frames if people is not None else 0
    if people is None and audio is None:
        raise video_error or audio_error
    scored = _scored_people(people, cfg.all_faces)
    rows = score_rows(cfg, item.item_id, status["duration_s"], records if people is not None else None, people,
                      scored, audio, _fusion_models(cfg))
    status.update(_status_of(item, people, scored, audio, video_error, audio_error))
    summary = summarise_scores(item, status, rows, people, audio is not None, cfg)
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
    parts = {"scores": (table, SCORES_SCHEMA, "video_id"),
             "tracks": (pa.Table.from_pylist(person_rows(item, people, rows, cfg), schema=TRACKS_SCHEMA),
                        TRACKS_SCHEMA, "video_id"),
             "summary": (pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA), SUMMARY_SCHEMA, "video_id")}
    cuts = people.cuts if people is not None else []
    files = {f"report/{item.item_id}.png": timeline_png(table, summary, cuts)} if rows else {}
    return parts, files


def _scored_people(people: People | None, all_faces: bool) -> list[int]:
    if people is None or not people.counts:
        return []
    return sorted(people.counts) if all_faces else [people.primary]


def _frames(records: Records | None, people: People | None, scored: list[int],
            cfg: ScoreVideosConfig) -> Iterator[tuple[float, dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """Second pass: every sampled frame in order as (time, {scored person: (centred embedding, probabilities)})."""
    if records is None:
        return
    means = {pid: people.mean(pid) for pid in scored}
    tracker, step = FaceTracker(cfg.tracker), 0
    for r in records():
        frames = track_frames(tracker, r.detected or (), step)
        step += len(frames)
        for frame in frames:
            faces = {}
            for tid, _, out in frame.faces:
                pid = people.of.get(tid)
                if pid in means:
                    faces[pid] = (out.embedding.astype(np.float32) - means[pid], out.probs)
            yield frame.timestamp_s, faces


def step_ends(duration: float, hop_s: float) -> np.ndarray:
    """The end times of an input's steps (one every ``hop_s``; a shorter input gets one step)."""
    ends = np.arange(1, int(np.floor(duration / hop_s + 1e-9)) + 1) * hop_s
    return np.array([duration]) if len(ends) == 0 and duration > 0 else ends


def score_rows(cfg: ScoreVideosConfig, video_id: str, duration: float, records: Records | None,
               people: People | None, scored: list[int], audio: AudioTimeline | None,
               models: dict[str, torch.nn.Module]) -> list[dict]:
    """One row per scored person and step they are on screen in, and one per step for the soundtrack
    (``track_id`` None) when there is audio. The frames stream by once: each window is cut as soon as
    its last frame is in, from the frames of the last ``window_s`` only, and fused in batches of
    ``batch_size``."""
    tv, ta = window_shape(cfg.window_s, cfg.fps)
    ends = step_ends(duration, cfg.hop_s)
    if audio is not None:  # as in training: the recording's own mean taken out
        audio = AudioTimeline(audio.times, centred(audio.features))
    series: list[int | None] = ([None] if audio is not None else []) + list(scored)
    rows: dict[tuple[int, int], dict] = {}
    pending: dict[str, list] = {}
    held: deque[tuple[float, dict]] = deque()  # the frames the next windows may take

    def fuse(modality: str) -> None:
        model = models.get({"audio+visual": "fused", "visual": "visual", "audio": "audio"}[modality], models["fused"])
        _fuse(model, pending.pop(modality, []), rows, tv, ta)

    def cut(j: int) -> None:
        end = float(ends[j])
        start, w_start = end - cfg.hop_s, max(0.0, end - cfg.window_s)
        while held and held[0][0] < w_start - 0.01:
            held.popleft()
        times = np.array([t for t, _ in held])
        has_audio = audio is not None and bool(np.any(in_span(audio.times, w_start, end)))
        aud = take(audio.times, audio.features, w_start, end, ta) if has_audio else None
        for k, pid in enumerate(series):
            vis, in_row = None, np.zeros(len(held), bool)
            if pid is not None:
                if not people.on_screen(pid, start, end):
                    continue
                present = np.array([pid in faces for _, faces in held], bool)
                in_row = present & in_span(times, start, end)
                if not (present & in_span(times, w_start, end)).any():
                    continue  # bridged, but no face of theirs in the window: nothing of them to score
                feats = np.stack([faces[pid][0] if pid in faces else np.zeros(VISUAL_DIM, np.float32)
                                  for _, faces in held])
                vis = take(times, feats, w_start, end, tv)
            modality = ("audio+visual" if vis is not None and aud is not None else "visual" if vis is not None
                        else "audio" if aud is not None else "none")
            probs = [faces[pid][1] for (_, faces), inside in zip(held, in_row) if inside]
            rows[k, j] = {"video_id": video_id, "track_id": pid, "t_start_s": float(start), "t_end_s": end,
                          "arousal": None, "valence": None, "face_detected": bool(in_row.any()), "modality": modality,
                          "expression_probs": np.mean(probs, axis=0).tolist() if probs else None}
            if modality != "none":
                pending.setdefault(modality, []).append(((k, j), vis, aud))
                if len(pending[modality]) >= cfg.batch_size:
                    fuse(modality)

    j = 0
    for t, faces in _frames(records, people, scored, cfg):
        while j < len(ends) and t >= ends[j] - 1e-6:  # every frame of window j is in
            cut(j)
            j += 1
        held.append((t, faces))
    while j < len(ends):
        cut(j)
        j += 1
    for modality in list(pending):
        fuse(modality)
    return [rows[key] for key in sorted(rows)]


@torch.inference_mode()
def _fuse(model: torch.nn.Module, items: list, rows: dict, tv: int, ta: int) -> None:
    if not items:
        return
    vis = torch.from_numpy(np.stack([v if v is not None else np.zeros((tv, VISUAL_DIM), np.float32)
                                     for _, v, _ in items]).astype(np.float32))
    aud = torch.from_numpy(np.stack([a if a is not None else np.zeros((ta, AUDIO_DIM), np.float32)
                                     for _, _, a in items]).astype(np.float32))
    for (key, _, _), (a, v) in zip(items, model(vis, aud).float().numpy()):
        rows[key]["arousal"], rows[key]["valence"] = float(a), float(v)


def _status_of(item: InputItem, people, scored, audio, video_error, audio_error) -> dict:
    """The status of a scored input: ok, or which modality was missing (it was scored without it)."""
    if video_error is not None and people is not None:
        return {"status": video_error.status, "error": f"{video_error} (scored the {people.n_frames} frames before)"}
    if item.kind == "audio":
        return {"status": "ok", "error": None}
    if people is None:
        return {"status": video_error.status, "error": f"{video_error}; scored from audio only"}
    if not scored:
        why = "scored from audio only" if audio is not None else "no audio track either: no scores"
        return {"status": "no_face", "error": why}
    if audio is None:
        return {"status": audio_error.status if audio_error else "no_audio", "error": "scored from faces only"}
    return {"status": "ok", "error": None}


def _dominant(probs: list) -> str | None:
    return AFFECTNET_CLASSES[int(np.argmax(np.mean(probs, axis=0)))] if probs else None


def summarise_scores(item: InputItem, status: dict, rows: list[dict], people: People | None,
                     has_audio: bool, cfg: ScoreVideosConfig) -> dict:
    """One summary row per input: mean/std of the scores, dominant expression, face coverage, people."""
    scored = [r for r in rows if r["arousal"] is not None]
    a = np.array([r["arousal"] for r in scored], np.float32)
    v = np.array([r["valence"] for r in scored], np.float32)
    probs = [r["expression_probs"] for r in rows if r["expression_probs"] is not None]
    primary = people.primary if people is not None else None
    coverage = people.counts[primary] / people.n_frames if primary is not None else (0.0 if people else None)
    return {
        "video_id": item.item_id, "source": redact(item.source), "status": status["status"],
        "duration_s": status["duration_s"], "n_steps": len(step_ends(status["duration_s"], cfg.hop_s)),
        "n_tracks": people.n_tracks if people is not None else 0,
        "n_people": len(people.counts) if people is not None else 0,
        "n_cuts": len(people.cuts) if people is not None else 0, "has_audio": has_audio,
        "modalities": ",".join(sorted({r["modality"] for r in rows})),
        "face_coverage": coverage,
        "arousal_mean": float(a.mean()) if len(a) else None, "valence_mean": float(v.mean()) if len(v) else None,
        "arousal_std": float(a.std()) if len(a) else None, "valence_std": float(v.std()) if len(v) else None,
        "dominant_expression": _dominant(probs), "scoring_version": SCORING_VERSION,
    }


def person_rows(item: InputItem, people: People | None, rows: list[dict], cfg: ScoreVideosConfig) -> list[dict]:
    """tracks/: one row per person of the input (scored or not), with their picture."""
    if people is None:
        return []
    out = []
    for pid in sorted(people.counts):
        mine = [r for r in rows if r["track_id"] == pid]
        scored = [r for r in mine if r["arousal"] is not None]
        spans = people.spans[pid]
        out.append({
            "video_id": item.item_id, "track_id": pid, "primary": pid == people.primary,
            "first_s": min(f for f, _ in spans), "last_s": max(t for _, t in spans),
            "seconds_on_screen": people.counts[pid] / cfg.fps, "n_frames": people.counts[pid],
            "n_tracks": len(spans),
            "arousal_mean": float(np.mean([r["arousal"] for r in scored])) if scored else None,
            "valence_mean": float(np.mean([r["valence"] for r in scored])) if scored else None,
            "dominant_expression": _dominant([r["expression_probs"] for r in mine if r["expression_probs"] is not None]),
            "crop": people.pictures[pid][1],
        })
    return out


VERSION_FILE = "VERSION"


def check_version(cfg: ScoreVideosConfig) -> None:
    """Refuse an output folder whose inputs were scored by another scoring version (their rows mean
    something else: one folder never mixes them); mark a new one with this version."""
    from aver.io.parts import list_names
    from aver.io.storage import exists, read_bytes, write_bytes_atomic

    so, uri = cfg.storage_options or None, join(cfg.output, VERSION_FILE)
    found = int(read_bytes(uri, so).decode().split()[0]) if exists(uri, so) else None
    if found is None and list_names(join(cfg.output, "status"), so):
        found = 1  # written before outputs carried a version
    if found is None:
        write_bytes_atomic(uri, f"{SCORING_VERSION}\n".encode(), so)
    elif found != SCORING_VERSION:
        raise ValueError(
            f"score_videos: {redact(cfg.output)} holds scores of scoring version {found}; this is version "
            f"{SCORING_VERSION} (rows of people where they are on screen, the soundtrack its own series; "
            f"docs/decisions.md). To rescore those inputs, give a new --output folder (or delete this one); "
            f"to keep reading them as they are, leave the folder as it is.")


def run(cfg: ScoreVideosConfig) -> dict[str, int]:
    """Score every pending input on the current Ray cluster, then rebuild the report; returns the
    count of each status among the inputs processed now."""
    from aver.io.media import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS

    listed = with_retries(lambda: list_inputs(cfg.input, cfg.storage_options, VIDEO_EXTENSIONS + AUDIO_EXTENSIONS),
                          cfg.retry, cfg.input)
    items = [i for i in listed if i.kind != "image"]
    with_retries(lambda: check_version(cfg), cfg.retry, cfg.output)
    work = with_retries(lambda: plan(cfg.output, cfg.storage_options, singles=[(i.item_id, vars(i)) for i in items]),
                        cfg.retry, cfg.output)
    print(f"score_videos: {len(items)} inputs; {work.n_complete} already complete, {len(work.units)} to do",
          flush=True)
    counts = {}
    if work.units:
        if cfg.identity_model:  # a registry name resolved here, read by the actors from OUTPUT/weights
            cfg.identity_model = absolute(ship(cfg.identity_model, join(cfg.output, "weights"),
                                               cfg.storage_options or None))
        else:
            print("score_videos: no --identity-model: face tracks link by motion only (a person who leaves the "
                  "frame for long or is cut away from comes back as another)", flush=True)
        connect(cfg)
        units, finalize = with_retries(lambda: plan_long_inputs(work.units, cfg, clip_s=cfg.clip_s, fps=cfg.fps,
                                                                max_duration_s=cfg.max_duration_s, audio=True),
                                       cfg.retry, cfg.output)
        say_clips("score_videos", units, finalize)
        counts = summarise("score_videos", run_stages(units, cfg, load=load_unit, model=VideoScorer,
                                                      commit=write_unit, id_column="video_id",
                                                      records_per_call=cfg.records_per_call, finalize=finalize),
                           len(work.units), cfg.output)
    if items:
        index, rebuilt = build_report(cfg.output, cfg.storage_options, cfg.report_page_size)
        print(f"score_videos: report {'at' if rebuilt else 'unchanged at'} {redact(index)}", flush=True)
    return counts
