"""Log-mel features with VGGish's reference conventions, and their cutting into model inputs."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from aver.constants import SAMPLE_RATE


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)  # HTK


@functools.lru_cache(maxsize=16)
def mel_matrix(n_bins: int, n_mels: int, f_min: float, f_max: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """``[n_bins, n_mels]`` triangular HTK-mel weights as VGGish builds them (DC bin zeroed)."""
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got {f_min}, {f_max}")
    bins_mel = _hz_to_mel(np.linspace(0.0, sample_rate / 2, n_bins))
    edges = np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return torch.from_numpy(weights.astype(np.float32))


def log_mel(waveform: np.ndarray | torch.Tensor, sample_rate: int, *, n_mels: int = 128, win_ms: float = 40.0,
            hop_ms: float = 40.0, f_min: float = 125.0, f_max: float = 7500.0) -> torch.Tensor:
    """``[frames, n_mels]`` float32 log-mel spectrogram following VGGish's frontend.

    ``waveform`` is mono ``[N]`` or ``[channels, N]`` (averaged), any sample rate (resampled to
    16 kHz). Periodic Hann window, FFT size the next power of two, magnitude spectrum, HTK mel,
    ``log(mel + 0.01)``; frames start at sample 0, no centring or padding. Runs on the input's device.
    """
    x = torch.as_tensor(waveform).float()
    if x.ndim == 2:
        x = x.mean(dim=0)
    if x.ndim != 1:
        raise ValueError(f"waveform must be [N] or [channels, N], got shape {tuple(x.shape)}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if sample_rate != SAMPLE_RATE:
        import torchaudio.functional as AF

        x = AF.resample(x, int(sample_rate), SAMPLE_RATE)
    win = int(round(SAMPLE_RATE * win_ms / 1000.0))
    hop = int(round(SAMPLE_RATE * hop_ms / 1000.0))
    if win < 2 or hop < 1:
        raise ValueError(f"window {win_ms} ms / hop {hop_ms} ms are too short at 16 kHz")
    n_fft = 2 ** math.ceil(math.log2(win))
    if x.numel() < win:
        return x.new_zeros((0, n_mels))
    frames = x.unfold(0, win, hop)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi / win * torch.arange(win, device=x.device, dtype=torch.float32))
    spectrum = torch.fft.rfft(frames * window, n=n_fft).abs()
    mel = spectrum @ mel_matrix(n_fft // 2 + 1, n_mels, float(f_min), float(f_max)).to(x.device)
    return torch.log(mel + 0.01)


def segment(mel: torch.Tensor, frames: int = 480, hop: int | None = None, *, pad_last: bool = False) -> torch.Tensor:
    """Cut ``[T, n_mels]`` into model inputs ``[N, 1, frames, n_mels]`` every ``hop`` frames.

    A tail shorter than ``frames`` is dropped, or with ``pad_last`` kept and padded with the
    log of silence (``log(0.01)``). Audio shorter than one segment gives ``N = 0`` unless padded.
    """
    if frames < 1:
        raise ValueError("frames must be positive")
    hop = frames if hop is None else hop
    if hop < 1:
        raise ValueError("hop must be positive")
    t, n_mels = mel.shape
    if pad_last and (t < frames or (t - frames) % hop):
        target = frames if t < frames else t + hop - (t - frames) % hop
        pad = mel.new_full((target - t, n_mels), math.log(0.01))
        mel = torch.cat([mel, pad])
        t = target
    if t < frames:
        return mel.new_zeros((0, 1, frames, n_mels))
    return mel.unfold(0, frames, hop).transpose(1, 2).unsqueeze(1).contiguous()
