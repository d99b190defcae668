"""Per-session feature timelines for fusion (paper §3.3) — shared by train_fusion and score_videos.

Visual: the student's 1920-d embedding and 8-class expression probabilities for the primary face at
``fps`` (rows without a face are zeros, flagged). Audio: VGGish ``frame_features`` of the arousal
and of the valence network, concatenated (256-d), one step per 8 log-mel frames (0.32 s).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from aver.audio import log_mel
from aver.face_data import to_student_input

AUDIO_STEP_S = 8 * 0.04  # VGGish keeps one step per 8 log-mel frames at the 40 ms hop


@dataclass
class VisualTimeline:
    times: np.ndarray
    """Sample times in seconds [N]."""
    features: np.ndarray
    """Student embeddings [N, 1920]; zeros where no face."""
    probs: np.ndarray
    """Expression probabilities [N, 8]; NaN where no face."""
    has_face: np.ndarray
    """[N] bool."""


@dataclass
class AudioTimeline:
    times: np.ndarray
    """Step start times [M] (0.32 s apart)."""
    features: np.ndarray
    """[M, 128 x number of VGGish networks]."""


@torch.no_grad()
def student_features(student: torch.nn.Module, jpegs: list[bytes], batch_size: int = 64,
                     device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N,1920], softmax probabilities [N,8]) of JPEG face crops."""
    from PIL import Image

    device = device or next(student.parameters()).device
    embs, probs = [], []
    for s in range(0, len(jpegs), batch_size):
        imgs = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((140, 140)))
                         for b in jpegs[s:s + batch_size]])
        out = student(to_student_input(imgs).to(device))
        embs.append(out.embedding.float().cpu().numpy())
        probs.append(torch.softmax(out.affectnet.float(), dim=1).cpu().numpy())
    if not embs:
        return np.zeros((0, 1920), np.float32), np.zeros((0, 8), np.float32)
    return np.concatenate(embs), np.concatenate(probs)


def visual_timeline(faces, student: torch.nn.Module) -> VisualTimeline:
    """From an extract_faces table of one video (pyarrow or pandas) to a visual timeline."""
    df = faces.to_pandas() if hasattr(faces, "to_pandas") else faces
    df = df.sort_values("timestamp_s")
    has_face = df["crop"].notna().to_numpy()
    n = len(df)
    feats = np.zeros((n, 1920), np.float32)
    probs = np.full((n, 8), np.nan, np.float32)
    if has_face.any():
        e, p = student_features(student, df.loc[has_face, "crop"].tolist())
        feats[has_face], probs[has_face] = e, p
    return VisualTimeline(df["timestamp_s"].to_numpy(np.float64), feats, probs, has_face)


@torch.no_grad()
def audio_timeline(waveform: np.ndarray, sample_rate: int, vggish: list[torch.nn.Module]) -> AudioTimeline:
    """VGGish frame features of the whole recording, one network after the other, concatenated."""
    mel = log_mel(waveform, sample_rate)
    if mel.shape[0] < 8:
        return AudioTimeline(np.zeros(0), np.zeros((0, 128 * len(vggish)), np.float32))
    x = mel[None, None]
    feats = [net.frame_features(x.to(next(net.parameters()).device)).float().cpu().numpy()[0] for net in vggish]
    f = np.concatenate(feats, axis=1)
    return AudioTimeline(np.arange(len(f)) * AUDIO_STEP_S, f.astype(np.float32))


def window_slices(duration_s: float, window_s: float, hop_s: float) -> list[tuple[float, float]]:
    """(start, end) of every full window inside ``duration_s``; one shorter window if the clip is shorter."""
    if duration_s <= 0:
        return []
    if duration_s < window_s:
        return [(0.0, duration_s)]
    n = int(np.floor((duration_s - window_s) / hop_s + 1e-9)) + 1
    return [(i * hop_s, i * hop_s + window_s) for i in range(n)]


def take(times: np.ndarray, values: np.ndarray, start: float, end: float, length: int) -> np.ndarray:
    """``length`` rows of ``values`` whose times fall in [start, end), resampled by nearest index
    so every window has the same shape (zeros when the modality has nothing there)."""
    inside = np.where((times >= start - 1e-6) & (times < end - 1e-6))[0]
    if len(inside) == 0:
        return np.zeros((length, values.shape[1]), np.float32)
    pick = inside[np.minimum((np.arange(length) * len(inside)) // length, len(inside) - 1)]
    return values[pick].astype(np.float32)
