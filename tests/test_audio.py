import math

import numpy as np
import pytest
import torch

from aver.audio import log_mel, segment


def _vggish_reference(x: np.ndarray, sr: int, n_mels: int, win_s: float, hop_s: float, lo: float, hi: float):
    # Independent numpy transcription of VGGish's mel_features.log_mel_spectrogram, loop style.
    win = int(round(sr * win_s))
    hop = int(round(sr * hop_s))
    n_fft = 2 ** int(np.ceil(np.log(win) / np.log(2.0)))
    n_frames = 1 + int(np.floor((len(x) - win) / hop))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi / win * np.arange(win))
    spec = np.stack([np.abs(np.fft.rfft(x[i * hop:i * hop + win] * hann, n_fft)) for i in range(n_frames)])
    n_bins = spec.shape[1]
    to_mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    bins_mel = to_mel(np.linspace(0.0, sr / 2.0, n_bins))
    edges = np.linspace(to_mel(lo), to_mel(hi), n_mels + 2)
    w = np.zeros((n_bins, n_mels))
    for m in range(n_mels):
        l, c, u = edges[m:m + 3]
        for b in range(n_bins):
            w[b, m] = max(0.0, min((bins_mel[b] - l) / (c - l), (u - bins_mel[b]) / (u - c)))
    w[0, :] = 0.0
    return np.log(spec @ w + 0.01)


@pytest.fixture
def speechlike():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    f0 = 140 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.3 * x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_log_mel_reproduces_vggish_frontend(speechlike):
    ours = log_mel(speechlike, 16000, n_mels=64, win_ms=25, hop_ms=10).numpy()
    ref = _vggish_reference(speechlike.astype(np.float64), 16000, 64, 0.025, 0.010, 125.0, 7500.0)
    assert ours.shape == ref.shape == (1 + (32000 - 400) // 160, 64)
    assert np.abs(ours - ref).max() < 2e-3


def test_log_mel_paper_defaults(speechlike):
    ours = log_mel(speechlike, 16000)
    ref = _vggish_reference(speechlike.astype(np.float64), 16000, 128, 0.040, 0.040, 125.0, 7500.0)
    assert ours.dtype == torch.float32
    assert ours.shape == (1 + (32000 - 640) // 640, 128) == ref.shape
    assert np.abs(ours.numpy() - ref).max() < 2e-3


def test_log_mel_resamples_other_rates():
    # A 1 kHz tone at 48 kHz and at 16 kHz must light the same mel bins after resampling.
    def tone(sr):
        return np.sin(2 * np.pi * 1000 * np.arange(sr) / sr).astype(np.float32)

    a, b = log_mel(tone(48000), 48000), log_mel(tone(16000), 16000)
    assert a.shape == b.shape
    assert a.mean(0).argmax() == b.mean(0).argmax()
    assert torch.allclose(a[2:-2], b[2:-2], atol=0.05)


def test_log_mel_stereo_and_short_inputs():
    stereo = np.random.default_rng(1).standard_normal((2, 16000)).astype(np.float32)
    assert torch.allclose(log_mel(stereo, 16000), log_mel(stereo.mean(0), 16000), atol=1e-5)
    assert log_mel(np.zeros(100, np.float32), 16000).shape == (0, 128)
    with pytest.raises(ValueError):
        log_mel(np.zeros((1, 2, 3)), 16000)


def test_segment_shapes_and_padding():
    mel = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 4)
    seg = segment(mel, 480)
    assert seg.shape == (2, 1, 480, 4)
    assert torch.equal(seg[1, 0], mel[480:960])
    padded = segment(mel, 480, pad_last=True)
    assert padded.shape == (3, 1, 480, 4)
    assert torch.equal(padded[2, 0, :40], mel[960:])
    assert torch.allclose(padded[2, 0, 40:], torch.full((440, 4), math.log(0.01)))
    assert segment(mel, 480, hop=240).shape == (3, 1, 480, 4)
    assert segment(mel[:100], 480).shape == (0, 1, 480, 4)


def test_log_mel_accepts_f_max_at_nyquist():
    x = torch.randn(16000)
    assert log_mel(x, 16000, f_max=8000).shape == (25, 128)
    assert log_mel(x, 16000, f_min=0.0).shape == (25, 128)
    with pytest.raises(ValueError):
        log_mel(x, 16000, f_max=8001)


def test_segment_pads_the_tail_to_one_last_segment_only():
    mel = torch.arange(12.0)[:, None].repeat(1, 4)  # 12 frames, 4 mel bins
    seg = segment(mel, 4, hop=3, pad_last=True)  # starts 0, 3, 6, 9: the last one is 3 frames + 1 pad
    assert seg.shape == (4, 1, 4, 4)
    assert seg[-1, 0, :3, 0].tolist() == [9.0, 10.0, 11.0]
    assert seg[-1, 0, 3, 0].item() == pytest.approx(math.log(0.01))

    seg = segment(torch.arange(12.0)[:, None].repeat(1, 4), 5, hop=3, pad_last=True)
    assert seg.shape == (4, 1, 5, 4) and seg[-1, 0, :3, 0].tolist() == [9.0, 10.0, 11.0]  # starts 0, 3, 6, 9
