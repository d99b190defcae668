from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aver.models._base import take_config

MODALITIES = ("visual", "audio")


@dataclass
class FusionConfig:
    visual_dim: int = 1920
    """Feature size of one visual time step (the student's embedding)."""
    audio_dim: int = 128
    """Feature size of one audio time step (VGGish frame features)."""
    modalities: tuple[str, ...] = MODALITIES
    """Which inputs are used: both (fused), ("visual",) or ("audio",) as in Table 3."""
    steps: int = 9
    """Time steps each pre-transform yields."""
    channels: int = 64
    """Channels each pre-transform yields."""
    stride: int = 3
    """Take every n-th input time step first (Fig. 3)."""
    hidden: int = 256
    """LSTM width."""
    layers: int = 2
    """LSTM layers."""

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if not self.modalities or any(m not in MODALITIES for m in self.modalities) or \
                len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"FusionConfig.modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")
        for name in ("visual_dim", "audio_dim", "steps", "channels", "stride", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"FusionConfig.{name} must be positive, got {getattr(self, name)}")


class _PreTransform(nn.Module):
    # Fig. 3: every 3rd step, Conv1d k=1, k=3, MaxPool1d(2,2), k=5, ReLUs; the final adaptive
    # pool makes the output exactly `steps` long whatever the window length. `standardise`: each
    # input feature scaled to unit variance first (running statistics, no affine): the student's
    # embedding carries valence in low-variance directions that an unscaled projection all but
    # ignores (docs/decisions.md, "The face carries valence").
    def __init__(self, cin: int, channels: int, steps: int, stride: int, standardise: bool = False) -> None:
        super().__init__()
        self.stride = stride
        self.body = nn.Sequential(
            *([nn.BatchNorm1d(cin, affine=False)] if standardise else []),
            nn.Conv1d(cin, 2 * channels, 1), nn.ReLU(inplace=True),
            nn.Conv1d(2 * channels, 2 * channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool1d(2, 2, ceil_mode=True),
            nn.Conv1d(2 * channels, channels, 5, padding=2), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool1d(steps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,T,D] -> [B,steps,channels]
        return self.body(x[:, :: self.stride].transpose(1, 2)).transpose(1, 2)


class FusionModel(nn.Module):
    """Model-level audio-visual fusion (Fig. 3): pre-transforms, 2-layer LSTM, tanh head.

    Built from a :class:`FusionConfig` or its fields (``FusionModel(visual_dim, audio_dim)``).

    ``forward(visual [B,Tv,visual_dim], audio [B,Ta,audio_dim]) -> [B,2]`` in (-1,1), columns
    (arousal, valence). Each pre-transform yields ``[B,9,64]``; the fused sequence is ``[B,9,128]``.
    With ``modalities=("visual",)`` or ``("audio",)`` the other input is ignored and may be None.
    """

    config_class = FusionConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.config = c = take_config(FusionConfig, args, kwargs)
        m = c.modalities
        self.visual_transform = _PreTransform(c.visual_dim, c.channels, c.steps, c.stride, standardise=True) \
            if "visual" in m else None
        self.audio_transform = _PreTransform(c.audio_dim, c.channels, c.steps, c.stride) if "audio" in m else None
        self.lstm = nn.LSTM(c.channels * len(m), c.hidden, num_layers=c.layers, batch_first=True)
        self.head = nn.Linear(c.hidden, 2)

    def forward(self, visual: torch.Tensor | None, audio: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.visual_transform is not None:
            if visual is None:
                raise ValueError("this FusionModel uses visual input; got None")
            parts.append(self.visual_transform(visual))
        if self.audio_transform is not None:
            if audio is None:
                raise ValueError("this FusionModel uses audio input; got None")
            parts.append(self.audio_transform(audio))
        seq = torch.cat(parts, dim=2)
        out, _ = self.lstm(seq)
        return torch.tanh(self.head(out[:, -1]))
