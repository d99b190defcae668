"""RECOLA sessions as training data: gold labels on the 40 ms grid, log-mel segments with mean
gold labels (VGGish, §3.2), and fusion windows of featurised sessions (§3.3)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aver.audio import log_mel
from aver.constants import LABEL_STEP_S as STEP_S
from aver.constants import SAMPLE_RATE
from aver.data.features import (AUDIO_DIM, VISUAL_DIM, audio_timeline, centred, face_features, take, window_shape,
                                window_slices)
from aver.data.manifests import read_arff, read_recola
from aver.faults import RetryPolicy, with_retries
from aver.io.media import MediaError, read_audio
from aver.io.parts import join
from aver.io.storage import exists, read_bytes, redact, write_bytes_atomic
from aver.tracking import TRACKING_VERSION


def session_labels(record: dict, storage_options: dict | None = None) -> np.ndarray:
    """``[N, 2]`` gold (arousal, valence) on the 40 ms grid, frame i at time i * 0.04 s."""
    columns = []
    for key in ("arousal_arff", "valence_arff"):
        times, values, _ = read_arff(record[key], storage_options)
        idx = np.round(np.asarray(times) / STEP_S).astype(int)
        grid = np.full(idx.max() + 1 if len(idx) else 0, np.nan, np.float32)
        grid[idx] = values
        columns.append(grid)
    n = min(len(c) for c in columns)
    labels = np.stack([c[:n] for c in columns], axis=1)
    # Missing frames are filled from the previous one (ARFFs are complete in practice).
    for j in range(2):
        col = labels[:, j]
        mask = np.isnan(col)
        if mask.all():
            raise ValueError(f"{record['name']}: no gold values")
        idx = np.where(~mask, np.arange(n), 0)
        np.maximum.accumulate(idx, out=idx)
        col[:] = col[idx]
        col[np.isnan(col)] = col[~np.isnan(col)][0]
    return labels


def session_mel(record: dict, storage_options: dict | None = None) -> np.ndarray:
    """``[frames, 128]`` log-mel at the paper's 40 ms window and hop (frame i starts at i * 0.04 s)."""
    source = record["audio"] or record["video"]
    return log_mel(read_audio(source, storage_options=storage_options), SAMPLE_RATE).numpy()


def audio_segments(record: dict, segment_frames: int, hop_frames: int,
                   storage_options: dict | None = None) -> list[dict]:
    """Segments ``mel [segment_frames, 128]`` with the mean (arousal, valence) over each segment."""
    try:
        mel = session_mel(record, storage_options)
    except MediaError:
        return []
    labels = session_labels(record, storage_options)
    n = min(len(mel), len(labels))
    out = []
    for start in range(0, n - segment_frames + 1, hop_frames):
        target = labels[start:start + segment_frames].mean(0)
        out.append({"session": record["name"], "start_s": start * STEP_S,
                    "mel": mel[start:start + segment_frames].astype(np.float32),
                    "arousal": float(target[0]), "valence": float(target[1])})
    return out


def recola_audio_dataset(root: str, split: str, *, segment_frames: int = 480, hop_frames: int = 40,
                         storage_options: dict | None = None):
    """Ray Dataset of VGGish training segments for the sessions of ``split`` (train/dev/test)."""
    import ray.data

    sessions = [r for r in read_recola(root, storage_options).records if r["split"] == split]
    if not sessions:
        raise ValueError(f"no {split} sessions with gold labels under {root}")
    ds = ray.data.from_items(sessions, override_num_blocks=len(sessions))
    return ds.flat_map(lambda r: audio_segments(r, segment_frames, hop_frames, storage_options))


@dataclass
class SessionWindows:
    """How RECOLA sessions become fusion windows: the models that featurise them and the windowing."""

    recola: str
    """RECOLA root in the AVEC 2016 layout: recordings_audio/*.wav, recordings_video/*.mp4,
    ratings_gold_standard/{arousal,valence}/*.arff (sessions train_N, dev_N)."""
    student: str
    """Student checkpoint (visual features)."""
    vggish_arousal: str
    """VGGish arousal checkpoint (audio features)."""
    vggish_valence: str
    """VGGish valence checkpoint (audio features)."""
    window_s: float = 9.6
    """Window length fed to the fusion model."""
    hop_s: float = 0.4
    """Windows start every hop_s."""
    target_s: float = 0.4
    """The target is the mean gold label over the window's last target_s."""
    fps: float = 5.0
    """Face sampling rate for visual features."""
    featurizers: int = 1
    """Most featurising actors, one session each at a time (the pool grows to it as the cluster has
    room); 0: one per session at most."""
    featurizer_cpus: float = 1.0
    """CPUs per featurising actor (student, VGGish and MTCNN together)."""
    featurizer_gpus: float = 0.0
    """GPU share per featurising actor; 0 runs on CPU (where CUDA is unreachable: CPU, said in the log)."""
    features_cache: str | None = None
    """Folder for per-session feature timelines, reused by every run with the same models and fps."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options."""

    def __post_init__(self) -> None:
        if not 0 < self.target_s <= self.window_s or self.hop_s <= 0 or self.fps <= 0:
            raise ValueError("need 0 < target_s <= window_s, hop_s > 0, fps > 0")
        if self.featurizers < 0 or self.featurizer_cpus <= 0 or self.featurizer_gpus < 0:
            raise ValueError("featurizers >= 0, featurizer_cpus > 0, featurizer_gpus >= 0")

    def features_key(self) -> str:
        """Names the feature timelines of one set of models, fps and tracking (which face is the
        primary one): the checkpoints' content hashes."""
        h = hashlib.sha256(f"fps={self.fps} tracking={TRACKING_VERSION}".encode())
        for uri in (self.student, self.vggish_arousal, self.vggish_valence):
            h.update(hashlib.sha256(read_bytes(uri, self.storage_options or None)).digest())
        return h.hexdigest()[:16]


class SessionFeaturizer:
    """Ray Data actor: session record -> fusion windows (visual, audio, target). Its session's
    timelines are cached under ``features_cache``: a rerun after a failure featurises only the
    sessions not done."""

    def __init__(self, cfg: SessionWindows) -> None:
        import torch

        torch.set_num_threads(max(1, int(round(cfg.featurizer_cpus))))  # Ray gives 1-CPU actors one thread
        self.cfg = cfg
        self.models: dict | None = None  # loaded on the first session not in the cache

    def _load(self) -> dict:
        from aver.faces import FaceDetector
        from aver.io.streaming import actor_device
        from aver.models import load_checkpoint

        if self.models is None:
            so = self.cfg.storage_options or None
            device = actor_device(self.cfg.featurizer_gpus, "SessionFeaturizer")
            self.models = {
                "student": load_checkpoint(self.cfg.student, storage_options=so)[0].to(device).eval(),
                "vggish": [load_checkpoint(uri, storage_options=so)[0].to(device).eval()
                           for uri in (self.cfg.vggish_arousal, self.cfg.vggish_valence)],
                "detector": FaceDetector(device=str(device))}
        return self.models

    def _timelines(self, record: dict) -> tuple:
        """(visual times, features | None, audio times, features | None) of a session, from the
        cache when an earlier run with the same models computed them. Visual features are the
        primary face track's, zeros where it is not on screen."""
        so = self.cfg.storage_options or None
        cache = self.cfg.features_cache
        uri = join(cache, f"{record['name']}.npz") if cache else None
        if uri and exists(uri, so):
            with np.load(io.BytesIO(read_bytes(uri, so)), allow_pickle=False) as z:
                return tuple(z[k] if z[k].size or k.endswith("times") else None
                             for k in ("visual_times", "visual", "audio_times", "audio"))
        m = self._load()
        vis_t, vis = np.zeros(0), None
        if record.get("video"):
            try:
                faces = with_retries(lambda: face_features(record["video"], m["detector"], m["student"],
                                                           fps=self.cfg.fps, storage_options=so),
                                     RetryPolicy(), record["video"])
                if faces.primary() is not None:
                    vis_t, vis = np.asarray(faces.times), faces.track(faces.primary())[1].astype(np.float32)
            except MediaError as e:
                print(f"{record['name']}: no visual features: {redact(str(e))}", flush=True)
        aud = None
        try:
            wave = with_retries(lambda: read_audio(record["audio"] or record["video"], storage_options=so),
                                RetryPolicy(), record["audio"] or record["video"])
            aud = audio_timeline(wave, SAMPLE_RATE, m["vggish"])
        except MediaError as e:
            print(f"{record['name']}: no audio features: {redact(str(e))}", flush=True)
        found = (vis_t, vis, aud.times if aud else np.zeros(0), aud.features if aud else None)
        if uri:
            buf = io.BytesIO()
            np.savez(buf, **{k: v if v is not None else np.zeros(0, np.float32)
                             for k, v in zip(("visual_times", "visual", "audio_times", "audio"), found)})
            write_bytes_atomic(uri, buf.getvalue(), so)
        return found

    def __call__(self, batch: dict) -> dict:
        cfg = self.cfg
        out = {"session": [], "visual": [], "audio": [], "target": []}
        tv, ta = window_shape(cfg.window_s, cfg.fps)
        for i in range(len(batch["name"])):
            record = {k: batch[k][i] for k in batch}
            labels = session_labels(record, cfg.storage_options or None)
            duration = len(labels) * STEP_S
            vis_t, vis, aud_t, aud = self._timelines(record)
            if vis is not None:  # zeros where the primary face is not on screen
                vis = centred(vis, np.abs(vis).sum(1) > 0)
            if aud is not None:
                aud = centred(aud)
            for start, end in window_slices(duration, cfg.window_s, cfg.hop_s):
                if end - start < cfg.window_s - 1e-6:
                    continue
                lo, hi = int(round((end - cfg.target_s) / STEP_S)), int(round(end / STEP_S))
                out["session"].append(record["name"])
                out["visual"].append(take(vis_t, vis, start, end, tv) if vis is not None
                                     else np.zeros((tv, VISUAL_DIM), np.float32))
                out["audio"].append(take(aud_t, aud, start, end, ta) if aud is not None
                                    else np.zeros((ta, AUDIO_DIM), np.float32))
                out["target"].append(labels[lo:hi].mean(0).astype(np.float32))
        return {"session": np.asarray(out["session"], dtype=object),
                "visual": np.stack(out["visual"]) if out["visual"] else np.zeros((0, tv, VISUAL_DIM), np.float32),
                "audio": np.stack(out["audio"]) if out["audio"] else np.zeros((0, ta, AUDIO_DIM), np.float32),
                "target": np.stack(out["target"]) if out["target"] else np.zeros((0, 2), np.float32)}


def _sessions(cfg: SessionWindows, split: str) -> list[dict]:
    sessions = [r for r in read_recola(cfg.recola, cfg.storage_options or None).records if r["split"] == split]
    if not sessions:
        raise ValueError(f"no {split} sessions under {redact(cfg.recola)}")
    return sessions


def count_windows(cfg: SessionWindows, split: str) -> int:
    """How many windows :func:`session_windows` will cut from ``split``: from the gold labels alone,
    so a run that cannot train is refused before any session is featurised."""
    total = 0
    for record in _sessions(cfg, split):
        duration = len(session_labels(record, cfg.storage_options or None)) * STEP_S
        total += sum(end - start >= cfg.window_s - 1e-6 for start, end in window_slices(duration, cfg.window_s, cfg.hop_s))
    return total


def session_windows(cfg: SessionWindows, split: str):
    """Materialised Ray Dataset of fusion windows for the sessions of ``split``, featurised by a pool
    of up to ``featurizers`` actors."""
    import ray.data
    from ray.data import ActorPoolStrategy

    sessions = _sessions(cfg, split)
    so = cfg.storage_options or None
    todo = sum(not (cfg.features_cache and exists(join(cfg.features_cache, f"{r['name']}.npz"), so)) for r in sessions)
    # sessions already in the cache are only read: one actor serves them (each actor is a process
    # with the models' imports), more only for sessions still to featurise
    most = max(1, min(cfg.featurizers or len(sessions), todo))
    if todo:
        print(f"featurising {todo} of {len(sessions)} {split} sessions (faces at {cfg.fps:g} fps, voice; "
              f"{most} actor{'s' if most > 1 else ''} at most)", flush=True)
    ds = ray.data.from_items(sessions, override_num_blocks=len(sessions))
    ds = ds.map_batches(SessionFeaturizer, fn_constructor_kwargs={"cfg": cfg}, batch_size=1,
                        compute=ActorPoolStrategy(min_size=1, max_size=most), num_cpus=cfg.featurizer_cpus,
                        num_gpus=cfg.featurizer_gpus)
    return ds.materialize()
