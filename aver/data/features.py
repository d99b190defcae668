"""Feature timelines for fusion (paper §3.3), shared by train_fusion, evaluate and score_videos.

Visual: the student's 1920-d embedding and 8-class expression probabilities of every face track at
``fps`` (:func:`face_features`, one pass through :func:`aver.faces.scan_video`). Audio: VGGish
``frame_features`` of the arousal and of the valence network, concatenated (256-d), one step per 8
log-mel frames (0.32 s). A fusion window takes a fixed number of steps of each (:func:`take`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from aver.audio import log_mel
from aver.constants import AFFECTNET_CLASSES, AUDIO_STEP_S, SAMPLE_RATE
from aver.faces import FaceDetector, FaceTracker, TrackedFrame, scan_video
from aver.models import Student, VGGishConfig, autocast

VISUAL_DIM = Student.embedding_dim
"""Width of one visual step: the student's embedding."""
AUDIO_DIM = 2 * VGGishConfig.embedding_dim
"""Width of one audio step: the arousal and the valence network's frame features."""


@dataclass
class AudioTimeline:
    times: np.ndarray
    """Step start times [M] (0.32 s apart)."""
    features: np.ndarray
    """[M, 128 x number of VGGish networks]."""


@dataclass
class FaceFeatures:
    """Student outputs of every person of one video (face tracks linked), per sampled frame."""

    times: list[float] = field(default_factory=list)
    """Time of each sampled frame."""
    feats: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    """person id -> {sampled-frame number: float16 embedding [1920]}."""
    probs: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    """person id -> {sampled-frame number: expression probabilities [8]}."""
    tracker: FaceTracker | None = None
    primary_person: int | None = None
    decoded_s: float = 0.0
    broken: object = None
    """The MediaError of a stream broken midway (frames before it are kept), else None."""

    def track(self, track_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(present [N] bool, embeddings [N,1920] float16, probabilities [N,8]) of one person over all
        sampled frames; zeros where they have no face."""
        n = len(self.times)
        present = np.zeros(n, bool)
        feats = np.zeros((n, VISUAL_DIM), np.float16)
        probs = np.zeros((n, len(AFFECTNET_CLASSES)), np.float32)
        steps = np.fromiter(self.feats.get(track_id, {}).keys(), int)
        if len(steps):
            present[steps] = True
            feats[steps] = np.stack(list(self.feats[track_id].values()))
            probs[steps] = np.stack(list(self.probs[track_id].values()))
        return present, feats, probs

    def primary(self) -> int | None:
        """The primary person (on screen longest and largest), None when no face was found."""
        return self.primary_person if self.feats else None


@torch.no_grad()
def student_features(student: torch.nn.Module, crops: list[np.ndarray], batch_size: int = 64,
                     device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N,1920], softmax probabilities [N,8]) of uint8 RGB face crops."""
    device = device or next(student.parameters()).device
    embs, probs = [], []
    for s in range(0, len(crops), batch_size):
        out = student(Student.preprocess(crops[s:s + batch_size], device))
        embs.append(out.embedding.float().cpu().numpy())
        probs.append(torch.softmax(out.affectnet.float(), dim=1).cpu().numpy())
    if not embs:
        return np.zeros((0, VISUAL_DIM), np.float32), np.zeros((0, len(AFFECTNET_CLASSES)), np.float32)
    return np.concatenate(embs), np.concatenate(probs)


def face_features(source: str, detector: FaceDetector, student: torch.nn.Module, *, fps: float,
                  batch_size: int = 64, storage_options: dict | None = None, **limits) -> FaceFeatures:
    """Detect, track and embed the faces of one video batch by batch (see :func:`aver.faces.scan_video`,
    which takes ``limits``), then link the tracks into people (by motion); raises its MediaError when
    nothing decoded."""
    found = FaceFeatures()
    device = next(student.parameters()).device

    def embed(frames: list[TrackedFrame]) -> None:
        crops, keys = [], []
        for f in frames:
            found.times.append(f.timestamp_s)
            for tid, _, crop in f.faces:
                crops.append(crop)
                keys.append((tid, f.step))
        if crops:
            with torch.inference_mode(), autocast(device):
                emb, prob = student_features(student, crops, batch_size, device)
            for (tid, step), e, p in zip(keys, emb.astype(np.float16), prob):
                found.feats.setdefault(tid, {})[step] = e
                found.probs.setdefault(tid, {})[step] = p

    scan = scan_video(source, detector, embed, fps=fps, storage_options=storage_options, jpeg=False, **limits)
    found.tracker, found.decoded_s, found.broken = scan.tracker, scan.decoded_s, scan.broken
    people = scan.tracker.people()
    for by in (found.feats, found.probs):  # a person's tracks never overlap in time: no frame twice
        tracks = dict(by)
        by.clear()
        for tid, steps in sorted(tracks.items()):
            if tid in people:
                by.setdefault(people[tid], {}).update(steps)
    found.primary_person = scan.tracker.primary(people)
    return found


VGGISH_CONTEXT = 64
"""Log-mel frames of context on each side of a chunk: more than the frame features' receptive
field (46 frames), and a multiple of their 8-frame step, so chunked features equal whole ones."""


@torch.no_grad()
def chunked_frame_features(net: torch.nn.Module, mel: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """``net.frame_features`` of ``[T, n_mels]`` as ``[T // 8, dim]``, computed ``chunk`` frames at a
    time with :data:`VGGISH_CONTEXT` frames of context on each side: memory (GPU included) stays
    bounded however long the recording, and the result equals one forward over all of it."""
    if chunk % 8 or chunk < 8:
        raise ValueError("chunk must be a positive multiple of 8 log-mel frames")
    device = next(net.parameters()).device
    n_steps, ctx = mel.shape[0] // 8, VGGISH_CONTEXT
    out = []
    for start in range(0, n_steps * 8, chunk):
        lo, hi = max(0, start - ctx), min(mel.shape[0], start + chunk + ctx)
        f = net.frame_features(mel[lo:hi][None, None].to(device)).float().cpu().numpy()[0]
        first = (start - lo) // 8
        out.append(f[first:first + min(chunk, n_steps * 8 - start) // 8])
    return np.concatenate(out) if out else np.zeros((0, net.config.embedding_dim), np.float32)


@dataclass
class MelChunk:
    """A stretch of a recording's log-mel with the context its VGGish frame features need: the
    features of ``mel`` from step ``skip`` on, ``steps`` of them, are the recording's features there
    (as :func:`chunked_frame_features` computes them)."""

    mel: np.ndarray
    """``[frames, n_mels]`` float32, context included."""
    skip: int
    """Feature steps of leading context."""
    steps: int
    """Feature steps this chunk contributes."""


def mel_chunks(waves: Iterable[np.ndarray], chunk: int = 4096) -> Iterator[MelChunk]:
    """The log-mel of 16 kHz audio given piece by piece (any lengths), ``chunk`` frames at a time
    with :data:`VGGISH_CONTEXT` frames of context on each side: the chunks'
    features, one after the other, equal :func:`chunked_frame_features` over the whole log-mel, and
    no more than a chunk and its context is held. The log-mel frames do not overlap (window = hop
    = 640 samples), so pieces are cut at multiples of 640 samples and their log-mels joined."""
    if chunk % 8 or chunk < 8:
        raise ValueError("chunk must be a positive multiple of 8 log-mel frames")
    hop, ctx = int(round(SAMPLE_RATE * 0.040)), VGGISH_CONTEXT
    tail = np.zeros(0, np.float32)
    mel = np.zeros((0, 0), np.float32)
    mel_start, start = 0, 0  # absolute frame of mel[0]; frame where the next chunk starts

    def emit(final: bool) -> Iterator[MelChunk]:
        nonlocal mel, mel_start, start
        end = mel_start + len(mel)
        while end >= start + chunk + ctx or (final and start < (end // 8) * 8):
            steps = min(chunk, (end // 8) * 8 - start) // 8
            lo, hi = max(0, start - ctx), min(end, start + chunk + ctx)
            yield MelChunk(mel[lo - mel_start:hi - mel_start].copy(), (start - lo) // 8, steps)
            start += chunk
            keep = max(0, start - ctx) - mel_start
            mel, mel_start = mel[keep:], mel_start + keep

    for wave in waves:
        joined = np.concatenate([tail, np.asarray(wave, np.float32)])
        whole = len(joined) // hop * hop
        tail = joined[whole:]
        if whole:
            m = log_mel(joined[:whole], SAMPLE_RATE).numpy()
            mel = m if not len(mel) else np.concatenate([mel, m])
            yield from emit(False)
    yield from emit(True)


def audio_timeline(waveform: np.ndarray, sample_rate: int, vggish: list[torch.nn.Module],
                   chunk: int = 4096) -> AudioTimeline:
    """VGGish frame features of a recording (in bounded chunks, see :func:`chunked_frame_features`),
    one network after the other, concatenated."""
    return mel_timeline(log_mel(waveform, sample_rate), vggish, chunk)


def mel_timeline(mel: torch.Tensor, vggish: list[torch.nn.Module], chunk: int = 4096) -> AudioTimeline:
    """:func:`audio_timeline` of a log-mel ``[T, n_mels]`` already computed (where the audio was decoded)."""
    width = sum(net.config.embedding_dim for net in vggish)
    if mel.shape[0] < 8:
        return AudioTimeline(np.zeros(0), np.zeros((0, width), np.float32))
    f = np.concatenate([chunked_frame_features(net, mel, chunk) for net in vggish], axis=1)
    return AudioTimeline(np.arange(len(f)) * AUDIO_STEP_S, f.astype(np.float32))


def centred(values: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """float32 ``values`` [N, D] minus their mean over the ``present`` rows (all rows by default),
    the absent rows zero: one recording's own average face or voice taken out (who it is, the
    room, the camera, the microphone), what changes over the recording kept. Fusion reads its
    inputs this way, in training and in scoring (decisions.md: a person's identity outweighed
    their expression in the raw embeddings)."""
    values = values.astype(np.float32)
    present = np.ones(len(values), bool) if present is None else present
    if not present.any():
        return np.zeros_like(values)
    return np.where(present[:, None], values - values[present].mean(0), 0).astype(np.float32)


def window_shape(window_s: float, fps: float) -> tuple[int, int]:
    """(visual steps, audio steps) of one fusion window."""
    return max(1, round(window_s * fps)), max(1, round(window_s / AUDIO_STEP_S))


def window_slices(duration_s: float, window_s: float, hop_s: float) -> list[tuple[float, float]]:
    """(start, end) of every full window inside ``duration_s``; one shorter window if the clip is shorter."""
    if duration_s <= 0:
        return []
    if duration_s < window_s:
        return [(0.0, duration_s)]
    n = int(np.floor((duration_s - window_s) / hop_s + 1e-9)) + 1
    return [(i * hop_s, i * hop_s + window_s) for i in range(n)]


def in_span(times: np.ndarray, start: float, end: float) -> np.ndarray:
    """[N] bool: which ``times`` fall in the half-open span [start, end)."""
    return (times >= start - 1e-6) & (times < end - 1e-6)


def take(times: np.ndarray, values: np.ndarray, start: float, end: float, length: int) -> np.ndarray:
    """``length`` rows of ``values`` whose times fall in [start, end), resampled by nearest index
    so every window has the same shape (zeros when the modality has nothing there)."""
    inside = np.where(in_span(times, start, end))[0]
    if len(inside) == 0:
        return np.zeros((length, values.shape[1]), np.float32)
    pick = inside[np.minimum((np.arange(length) * len(inside)) // length, len(inside) - 1)]
    return values[pick].astype(np.float32)
