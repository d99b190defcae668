"""score_videos: a media archive -> per-time-step arousal/valence and expression probabilities.

One unit of work per input file, streamed inside one actor that holds every model: decode at
``fps`` -> MTCNN + tracks -> student embeddings and 8-class probabilities per face crop (chunk by
chunk, so no video is ever held whole) -> VGGish frame features of the audio -> fusion over
sliding windows. Each step of ``hop_s`` gets one row per scored face track (the primary one, or
every track with ``all_faces``) from the window of ``window_s`` ending there. A row uses what is
there: both modalities (``audio+visual``), the face alone (``visual``: no audio track), the voice
alone (``audio``: no face in the window, or an audio file), or nothing (``none``: null scores).

Per input, written atomically in this order: ``scores/<id>.parquet``, ``summary/<id>.parquet``,
``report/<id>.png``, then ``status/<id>.parquet`` (its presence means "complete"). The run ends by
rebuilding ``report/`` (index, pages, circumplex) from ``status/`` and ``summary/`` when they changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from aver.constants import AFFECTNET_CLASSES, SAMPLE_RATE
from aver.data.features import (AUDIO_DIM, VISUAL_DIM, FaceFeatures, audio_timeline, face_features, in_span, take,
                                window_shape)
from aver.data.recola import SessionWindows
from aver.faces import FaceDetector, FaceDetectorConfig
from aver.faults import MediaError, verdict, with_retries
from aver.io.media import MAX_DURATION_S, InputItem, list_inputs, read_audio
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
    """Inputs that decode longer than this get status too_large (the audio is held whole)."""

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


def load_unit(unit: dict, cfg: ScoreVideosConfig) -> dict:
    """Load stage (CPU task): nothing yet; an input is decoded in the model stage for now (see
    docs/decisions.md, issue 14)."""
    return {"unit": unit}


def write_unit(record: dict, cfg: ScoreVideosConfig) -> list[dict]:
    """Write stage (CPU task): scores/, summary/, the timeline PNG, then the status row."""
    unit = record["unit"]
    if "failure" in record:
        status, error = record["failure"]
        item = unit["items"][0]
        parts, files = {}, {}
        statuses = [{"video_id": item["item_id"], "source": redact(item["source"]), "n_frames": 0,
                     "duration_s": None, "status": status, "error": error}]
    else:
        parts, files, statuses = record["parts"], record["files"], record["statuses"]
    commit(cfg.output, unit, parts, statuses, id_column="video_id", storage_options=cfg.storage_options,
           policy=cfg.retry, files=files)
    return statuses


class VideoScorer(ModelStage):
    """Model stage (Ray Data actor): every model of the pipeline on one device; scores whole inputs."""

    def __init__(self, cfg: ScoreVideosConfig) -> None:
        from aver.io.storage import exists

        self.cfg = cfg
        so = cfg.storage_options or None
        self.device = actor_setup(cfg, "score_videos VideoScorer")
        self.models: dict[str, torch.nn.Module] = {}
        for key, name in MODEL_FILES.items():
            uri = join(cfg.model, name)
            if key in ("visual", "audio") and not exists(uri, so):
                continue  # one-modality rows fall back to the fused model with that input zeroed
            model, _ = load_checkpoint(uri, storage_options=so)
            self.models[key] = model.to(self.device, memory_format=torch.channels_last).eval()
        self.detector = FaceDetector(cfg.detector, device=str(self.device))
        self.autocast = autocast(self.device)

    def run(self, records: list[dict]) -> None:
        for r in records:
            r["parts"], r["files"], r["statuses"] = self.process(r["unit"])

    def process(self, unit: dict) -> tuple[dict, dict, list[dict]]:
        """One input's output parts, report files and status row; whatever it raises ends in the row."""
        item = InputItem(**unit["items"][0])
        status: dict[str, Any] = {"video_id": item.item_id, "source": redact(item.source), "n_frames": 0,
                                  "duration_s": None, "status": "ok", "error": None}
        try:
            item.check()
            parts, files = self.score(item, status)
        except Exception as e:  # noqa: BLE001 - whatever one input raises ends in its status row
            status["status"], status["error"] = verdict(e, item.source)
            parts, files = {}, {}
        return parts, files, [status]

    # -- one input -------------------------------------------------------------------------
    def score(self, item: InputItem, status: dict) -> tuple[dict, dict]:
        """Score one input: fills ``status`` and returns its output parts and report files.
        Storage faults are retried here (the whole input again); a content verdict about one
        modality leaves the other to score."""
        found = with_retries(lambda: self._decode(item), self.cfg.retry, item.source)  # a retry starts over
        tracks, video_error, audio, audio_s, audio_error = found
        video_s = tracks.decoded_s if tracks is not None else 0.0
        status["duration_s"] = round(max(video_s, audio_s), 6)
        status["n_frames"] = len(tracks.times) if tracks is not None else 0
        if tracks is None and audio is None:
            err = video_error or audio_error
            raise err
        track_ids = self._scored_tracks(tracks)
        rows = self._rows(item.item_id, status["duration_s"], tracks, track_ids, audio)
        status.update(_status_of(item, tracks, track_ids, audio, video_error, audio_error))
        summary = summarise_scores(item, status, rows, tracks, audio is not None)
        table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
        parts = {"scores": (table, "video_id"),
                 "summary": (pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA), "video_id")}
        files = {f"report/{item.item_id}.png": timeline_png(table, summary)} if rows else {}
        return parts, files

    def _decode(self, item: InputItem):
        """Faces (tracked and embedded) and audio features of one input, each with the content
        verdict that stopped it, if any; a stream broken midway keeps what decoded."""
        cfg, tracks, video_error = self.cfg, None, None
        if item.kind != "audio":
            try:
                tracks = face_features(item.source, self.detector, self.models["student"], fps=cfg.fps,
                                       batch_size=cfg.batch_size, storage_options=cfg.storage_options,
                                       max_bytes=cfg.max_bytes, max_duration_s=cfg.max_duration_s)
                video_error = tracks.broken
            except MediaError as e:
                video_error = e
        audio, audio_s, audio_error = None, 0.0, None
        if not (video_error is not None and video_error.status in ("corrupt", "too_large") and tracks is None):
            try:
                with torch.inference_mode(), self.autocast:
                    wave = read_audio(item.source, storage_options=cfg.storage_options or None,
                                      max_duration_s=cfg.max_duration_s)
                    audio_s = len(wave) / SAMPLE_RATE
                    audio = audio_timeline(wave, SAMPLE_RATE, [self.models["vggish_arousal"],
                                                               self.models["vggish_valence"]])
                if len(audio.times) == 0:
                    audio, audio_error = None, MediaError("too_short", "audio shorter than one VGGish step")
            except MediaError as e:
                audio_error = e
        return tracks, video_error, audio, audio_s, audio_error

    def _scored_tracks(self, tracks: FaceFeatures | None) -> list[int]:
        if tracks is None or not tracks.feats:
            return []
        if self.cfg.all_faces:
            return sorted(tracks.feats)
        return [tracks.primary()]

    def _rows(self, video_id: str, duration: float, tracks: FaceFeatures | None, track_ids: list[int],
              audio) -> list[dict]:
        """One row per (track, step); with no face track, one audio (or empty) row per step."""
        cfg = self.cfg
        tv, ta = window_shape(cfg.window_s, cfg.fps)
        ends = np.arange(1, int(np.floor(duration / cfg.hop_s + 1e-9)) + 1) * cfg.hop_s
        if len(ends) == 0 and duration > 0:
            ends = np.array([duration])
        times = np.asarray(tracks.times) if tracks is not None else np.zeros(0)
        rows: list[dict] = []
        windows: dict[str, list[tuple[int, np.ndarray | None, np.ndarray | None]]] = {}
        for tid in (track_ids or [None]):
            present, feats, probs = tracks.track(tid) if tid is not None else (np.zeros(len(times), bool), None, None)
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
            self._fuse(modality, items, rows, tv, ta)
        return rows

    @torch.inference_mode()
    def _fuse(self, modality: str, items: list, rows: list[dict], tv: int, ta: int) -> None:
        key = {"audio+visual": "fused", "visual": "visual", "audio": "audio"}[modality]
        model = self.models.get(key, self.models["fused"])
        for part in chunked(iter(items), self.cfg.batch_size):
            vis = torch.from_numpy(np.stack([v if v is not None else np.zeros((tv, VISUAL_DIM), np.float32)
                                             for _, v, _ in part]).astype(np.float32))
            aud = torch.from_numpy(np.stack([a if a is not None else np.zeros((ta, AUDIO_DIM), np.float32)
                                             for _, _, a in part]).astype(np.float32))
            if self.device.type == "cuda":
                vis, aud = vis.pin_memory(), aud.pin_memory()
            with self.autocast:
                pred = model(vis.to(self.device, non_blocking=True), aud.to(self.device, non_blocking=True))
            for (i, _, _), (a, v) in zip(part, pred.float().cpu().numpy()):
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

    connect(cfg)
    listed = with_retries(lambda: list_inputs(cfg.input, cfg.storage_options, VIDEO_EXTENSIONS + AUDIO_EXTENSIONS),
                          cfg.retry, cfg.input)
    items = [i for i in listed if i.kind != "image"]
    work = with_retries(lambda: plan(cfg.output, cfg.storage_options, singles=[(i.item_id, vars(i)) for i in items]),
                        cfg.retry, cfg.output)
    print(f"score_videos: {len(items)} inputs; {work.n_complete} already complete, {len(work.units)} to do",
          flush=True)
    stages = run_stages(work.units, cfg, load=load_unit, model=VideoScorer, write=write_unit, id_column="video_id")
    counts = summarise("score_videos", stages, ()) if work.units else {}
    if items:
        index, rebuilt = build_report(cfg.output, cfg.storage_options, cfg.report_page_size)
        print(f"score_videos: report {'at' if rebuilt else 'unchanged at'} {redact(index)}", flush=True)
    return counts
