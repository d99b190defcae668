"""RECOLA sessions as training data: log-mel segments with mean gold labels (VGGish, §3.2) and
gold labels aligned to 40 ms frames."""

from __future__ import annotations

import numpy as np

from aver.audio import log_mel
from aver.datasets import read_arff, read_recola
from aver.media import MediaError, read_audio

STEP_S = 0.04


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
    return log_mel(read_audio(source, storage_options=storage_options), 16000).numpy()


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
