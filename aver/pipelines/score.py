"""score_videos: a media archive -> per-time-step arousal/valence and expression probabilities.

One unit of work per input file, in three stages: a CPU task decodes frames at ``fps`` (segment
by segment, so no video is ever held whole) and the audio's log-mel; model actors run MTCNN, the
student (embeddings and 8-class probabilities per face crop) and VGGish (frame features, in bounded
chunks); a write task links the faces into tracks and runs the fusion model over sliding windows.
Each step of ``hop_s`` gets one row per scored face track (the primary one, or every track with
``all_faces``) from the window of ``window_s`` ending there. A row uses what is there: both
modalities (``audio+visual``), the face alone (``visual``: no audio track), the voice alone
(``audio``: no face in the window, or an audio file), or nothing (``none``: null scores).

Per input, written atomically in this order: ``scores/<id>.parquet``, ``summary/<id>.parquet``,
``report/<id>.png``, then ``status/<id>.parquet`` (its presence means "complete"). The run ends by
rebuilding ``report/`` (index, pages, circumplex) from ``status/`` and ``summary/`` when they changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from aver.constants import AFFECTNET_CLASSES, SAMPLE_RATE
from aver.audio import log_mel
from aver.data.features import (AUDIO_DIM, VISUAL_DIM, AudioTimeline, FaceFeatures, centred, in_span, mel_timeline,
                                student_features, take, window_shape)
from aver.data.recola import SessionWindows
from aver.faces import (Decoded, FaceDetector, FaceDetectorConfig, FaceTracker, detect_frames, frame_segments,
                        track_frames)
from aver.faults import MediaError, verdict, with_retries
from aver.io.media import FRAME_MAX_SIDE, MAX_DURATION_S, InputItem, list_inputs, read_audio
from aver.io.parts import join
from aver.io.storage import redact
from aver.io.streaming import chunked
from aver.models import autocast, load_checkpoint
from aver.pipelines.report import SCORES_SCHEMA, SUMMARY_SCHEMA, build_report, timeline_png
from aver.pipelines.units import ActorPoolConfig, ModelStage, actor_setup, commit, connect, plan, run_stages, summarise

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
    """Score every face track; default only the primary one (on screen longest and largest)."""
    detector: FaceDetectorConfig = field(default_factory=FaceDetectorConfig)
    """MTCNN and crop settings."""
    batch_size: int = 64
    """Face crops per student batch and windows per fusion batch."""
    report_page_size: int = 200
    """Inputs per report page (the index lists every input and links to its page)."""
    max_bytes: int = 20 * 2**30
    """Inputs larger than this get status too_large."""
    max_duration_s: float = MAX_DURATION_S
    """Inputs that decode longer than this get status too_large (the audio's log-mel is held whole)."""
    frame_max_side: int = FRAME_MAX_SIDE
    """Sampled frames larger than this on their longer side are downscaled where they are decoded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.detector, dict):
            self.detector = FaceDetectorConfig(**self.detector)
        if not 0 < self.fps <= 120:
            raise ValueError(f"fps must be in (0, 120], got {self.fps}")
        if self.window_s <= 0 or self.hop_s <= 0 or self.hop_s > self.window_s:
            raise ValueError("need window_s > 0 and 0 < hop_s <= window_s")
        if self.batch_size < 1 or self.report_page_size < 1:
            raise ValueError("batch_size and report_page_size must be >= 1")


def load_unit(unit: dict, cfg: ScoreVideosConfig) -> Iterator[dict]:
    """Load stage (CPU task): a video's sampled frames in segments of ``detector.batch_size``,
    then a last record with what decoding saw, the audio's log-mel (decoded once) and the verdict
    that stopped either modality, if any."""
    item = InputItem(**unit["items"][0])
    item.check()
    decoded, video_error = None, None
    if item.kind != "audio":
        decoded = Decoded()
        try:
            for frames in frame_segments(item.source, decoded, fps=cfg.fps, detector=cfg.detector,
                                         retry=cfg.retry, max_side=cfg.frame_max_side,
                                         storage_options=cfg.storage_options, max_bytes=cfg.max_bytes,
                                         max_duration_s=cfg.max_duration_s):
                yield {"unit": unit, "frames": frames}
            video_error = decoded.broken
        except MediaError as e:  # no usable video: what was handed on is dropped, the audio may score
            decoded, video_error = None, e
    last = {"unit": unit, "decoded": decoded, "video_error": video_error, "mel": None, "audio_s": 0.0,
            "audio_error": None}
    if not (video_error is not None and video_error.status in ("corrupt", "too_large") and decoded is None):
        try:
            wave = with_retries(lambda: read_audio(item.source, storage_options=cfg.storage_options or None,
                                                   max_duration_s=cfg.max_duration_s), cfg.retry, item.source)
            last["audio_s"] = len(wave) / SAMPLE_RATE
            mel = log_mel(wave, SAMPLE_RATE)
            if mel.shape[0] < 8:
                last["audio_error"] = MediaError("too_short", "audio shorter than one VGGish step")
            else:
                last["mel"] = mel.numpy()
        except MediaError as e:
            last["audio_error"] = e
    yield last


class VideoScorer(ModelStage):
    """Model stage (Ray Data actor): MTCNN, the student and both VGGish networks on one device.
    The frames of several segments are detected and their faces embedded together; the audio's
    log-mel goes through VGGish in bounded chunks."""

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
        self.autocast = autocast(self.device)

    @torch.inference_mode()
    def run(self, records: list[dict]) -> None:
        segments = [r for r in records if r.get("frames")]
        frames = [f for r in segments for f in r["frames"]]
        found = detect_frames(self.detector, frames, jpeg=False) if frames else []
        crops = [crop for faces in found for _, crop in faces]
        with self.autocast:
            emb, prob = student_features(self.models["student"], crops, self.cfg.batch_size, self.device)
        k = 0
        embedded = []
        for faces in found:
            embedded.append([(d, (emb[k + i].astype(np.float16), prob[k + i])) for i, (d, _) in enumerate(faces)])
            k += len(faces)
        start = 0
        for r in segments:
            n = len(r["frames"])
            r["detected"] = [(f.index, f.timestamp_s, faces)
                             for f, faces in zip(r["frames"], embedded[start:start + n])]
            start += n
        for r in records:
            if r.get("mel") is not None:
                with self.autocast:
                    r["audio"] = mel_timeline(torch.from_numpy(r["mel"]), [self.models["vggish_arousal"],
                                                                           self.models["vggish_valence"]])


_FUSION: dict[tuple[str, str], torch.nn.Module] = {}
"""Fusion models loaded by this worker process, by (model folder, key): write tasks reuse them."""


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


def write_unit(records: list[dict], cfg: ScoreVideosConfig) -> list[dict]:
    """Write task: the input's faces linked into tracks, the fusion windows scored (on this task's
    CPU: the fusion model is small beside the others), then scores/, summary/, the timeline PNG and
    last the status row."""
    unit = records[0]["unit"]
    item = InputItem(**unit["items"][0])
    status: dict[str, Any] = {"video_id": item.item_id, "source": redact(item.source), "n_frames": 0,
                              "duration_s": None, "status": "ok", "error": None}
    failed = next((r["failure"] for r in records if "failure" in r), None)
    parts, files = {}, {}
    if failed:
        status["status"], status["error"] = failed
    else:
        try:
            parts, files = _score(item, records, status, cfg)
        except Exception as e:  # noqa: BLE001 - whatever one input raises ends in its status row
            status["status"], status["error"] = verdict(e, item.source)
            parts, files = {}, {}
    commit(cfg.output, unit, parts, [status], id_column="video_id", storage_options=cfg.storage_options,
           policy=cfg.retry, files=files)
    return [status]


def _tracks(records: list[dict], decoded: Decoded) -> FaceFeatures:
    tracker, found = FaceTracker(), FaceFeatures()
    for frame in track_frames(tracker, (f for r in records for f in r.get("detected", ()))):
        found.times.append(frame.timestamp_s)
        for tid, _, (emb, prob) in frame.faces:
            found.feats.setdefault(tid, {})[frame.step] = emb
            found.probs.setdefault(tid, {})[frame.step] = prob
    found.tracker, found.decoded_s, found.broken = tracker, decoded.decoded_s, decoded.broken
    return found


def _score(item: InputItem, records: list[dict], status: dict, cfg: ScoreVideosConfig) -> tuple[dict, dict]:
    """Score one input: fills ``status`` and returns its output parts and report files; a content
    verdict about one modality leaves the other to score."""
    last = records[-1]
    tracks = _tracks(records, last["decoded"]) if last["decoded"] is not None else None
    video_error, audio, audio_error = last["video_error"], last.get("audio"), last["audio_error"]
    video_s = tracks.decoded_s if tracks is not None else 0.0
    status["duration_s"] = round(max(video_s, last["audio_s"]), 6)
    status["n_frames"] = len(tracks.times) if tracks is not None else 0
    if tracks is None and audio is None:
        raise video_error or audio_error
    track_ids = _scored_tracks(tracks, cfg.all_faces)
    rows = score_rows(cfg, item.item_id, status["duration_s"], tracks, track_ids, audio, _fusion_models(cfg))
    status.update(_status_of(item, tracks, track_ids, audio, video_error, audio_error))
    summary = summarise_scores(item, status, rows, tracks, audio is not None)
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
    parts = {"scores": (table, "video_id"),
             "summary": (pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA), "video_id")}
    files = {f"report/{item.item_id}.png": timeline_png(table, summary)} if rows else {}
    return parts, files


def _scored_tracks(tracks: FaceFeatures | None, all_faces: bool) -> list[int]:
    if tracks is None or not tracks.feats:
        return []
    return sorted(tracks.feats) if all_faces else [tracks.primary()]


def score_rows(cfg: ScoreVideosConfig, video_id: str, duration: float, tracks: FaceFeatures | None,
               track_ids: list[int], audio, models: dict[str, torch.nn.Module]) -> list[dict]:
    """One row per (track, step); with no face track, one audio (or empty) row per step."""
    tv, ta = window_shape(cfg.window_s, cfg.fps)
    ends = np.arange(1, int(np.floor(duration / cfg.hop_s + 1e-9)) + 1) * cfg.hop_s
    if len(ends) == 0 and duration > 0:
        ends = np.array([duration])
    times = np.asarray(tracks.times) if tracks is not None else np.zeros(0)
    if audio is not None:  # as in training: the recording's own mean taken out
        audio = AudioTimeline(audio.times, centred(audio.features))
    rows: list[dict] = []
    windows: dict[str, list[tuple[int, np.ndarray | None, np.ndarray | None]]] = {}
    for tid in (track_ids or [None]):
        present, feats, probs = tracks.track(tid) if tid is not None else (np.zeros(len(times), bool), None, None)
        if feats is not None:
            feats = centred(feats, present)
        for end in ends:
            start, w_start = end - cfg.hop_s, max(0.0, end - cfg.window_s)
            in_row = present & in_span(times, start, end)
            in_window = present & in_span(times, w_start, end)
            has_audio = audio is not None and bool(np.any(in_span(audio.times, w_start, end)))
            vis = take(times, feats, w_start, end, tv) if in_window.any() else None
            aud = take(audio.times, audio.features, w_start, end, ta) if has_audio else None
            modality = ("audio+visual" if vis is not None and aud is not None else "visual" if vis is not None
                        else "audio" if aud is not None else "none")
            row = {"video_id": video_id, "track_id": tid, "t_start_s": float(start), "t_end_s": float(end),
                   "arousal": None, "valence": None, "face_detected": bool(in_row.any()), "modality": modality,
                   "expression_probs": probs[in_row].mean(0).tolist() if in_row.any() else None}
            rows.append(row)
            if modality != "none":
                windows.setdefault(modality, []).append((len(rows) - 1, vis, aud))
    for modality, items in windows.items():
        model = models.get({"audio+visual": "fused", "visual": "visual", "audio": "audio"}[modality], models["fused"])
        _fuse(model, items, rows, tv, ta, cfg.batch_size)
    return rows


@torch.inference_mode()
def _fuse(model: torch.nn.Module, items: list, rows: list[dict], tv: int, ta: int, batch_size: int) -> None:
    for part in chunked(iter(items), batch_size):
        vis = torch.from_numpy(np.stack([v if v is not None else np.zeros((tv, VISUAL_DIM), np.float32)
                                         for _, v, _ in part]).astype(np.float32))
        aud = torch.from_numpy(np.stack([a if a is not None else np.zeros((ta, AUDIO_DIM), np.float32)
                                         for _, _, a in part]).astype(np.float32))
        for (i, _, _), (a, v) in zip(part, model(vis, aud).float().numpy()):
            rows[i]["arousal"], rows[i]["valence"] = float(a), float(v)


def _status_of(item: InputItem, tracks, track_ids, audio, video_error, audio_error) -> dict:
    """The status of a scored input: ok, or which modality was missing (it was scored without it)."""
    if video_error is not None and tracks is not None:
        return {"status": video_error.status, "error": f"{video_error} (scored the {len(tracks.times)} frames before)"}
    if item.kind == "audio":
        return {"status": "ok", "error": None}
    if tracks is None:
        return {"status": video_error.status, "error": f"{video_error}; scored from audio only"}
    if not track_ids:
        why = "scored from audio only" if audio is not None else "no audio track either: no scores"
        return {"status": "no_face", "error": why}
    if audio is None:
        return {"status": audio_error.status if audio_error else "no_audio", "error": "scored from faces only"}
    return {"status": "ok", "error": None}


def summarise_scores(item: InputItem, status: dict, rows: list[dict], tracks: FaceFeatures | None,
                     has_audio: bool) -> dict:
    """One summary row per input: mean/std of the scores, dominant expression, face coverage."""
    scored = [r for r in rows if r["arousal"] is not None]
    a = np.array([r["arousal"] for r in scored], np.float32)
    v = np.array([r["valence"] for r in scored], np.float32)
    probs = [r["expression_probs"] for r in rows if r["expression_probs"] is not None]
    primary = tracks.primary() if tracks is not None else None
    coverage = (len(tracks.feats[primary]) / len(tracks.times)) if primary is not None else (0.0 if tracks else None)
    return {
        "video_id": item.item_id, "source": redact(item.source), "status": status["status"],
        "duration_s": status["duration_s"], "n_steps": len({(r["t_start_s"]) for r in rows}),
        "n_tracks": len(tracks.feats) if tracks is not None else 0, "has_audio": has_audio,
        "modalities": ",".join(sorted({r["modality"] for r in rows})),
        "face_coverage": coverage,
        "arousal_mean": float(a.mean()) if len(a) else None, "valence_mean": float(v.mean()) if len(v) else None,
        "arousal_std": float(a.std()) if len(a) else None, "valence_std": float(v.std()) if len(v) else None,
        "dominant_expression": AFFECTNET_CLASSES[int(np.argmax(np.mean(probs, axis=0)))] if probs else None,
    }


def run(cfg: ScoreVideosConfig) -> dict[str, int]:
    """Score every pending input on the current Ray cluster, then rebuild the report; returns the
    count of each status among the inputs processed now."""
    from aver.io.media import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS

    listed = with_retries(lambda: list_inputs(cfg.input, cfg.storage_options, VIDEO_EXTENSIONS + AUDIO_EXTENSIONS),
                          cfg.retry, cfg.input)
    items = [i for i in listed if i.kind != "image"]
    work = with_retries(lambda: plan(cfg.output, cfg.storage_options, singles=[(i.item_id, vars(i)) for i in items]),
                        cfg.retry, cfg.output)
    print(f"score_videos: {len(items)} inputs; {work.n_complete} already complete, {len(work.units)} to do",
          flush=True)
    counts = {}
    if work.units:
        connect(cfg)
        counts = summarise("score_videos", run_stages(work.units, cfg, load=load_unit, model=VideoScorer,
                                                      write=write_unit, id_column="video_id",
                                                      records_per_call=cfg.records_per_call), len(work.units), cfg.output)
    if items:
        index, rebuilt = build_report(cfg.output, cfg.storage_options, cfg.report_page_size)
        print(f"score_videos: report {'at' if rebuilt else 'unchanged at'} {redact(index)}", flush=True)
    return counts
