from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from aver.models._base import take_config
from aver.models.weights import load_state_dict


@dataclass
class VGGishConfig:
    embedding_dim: int = 128
    """Size of the audio emotion embedding (last FC layer)."""
    hidden_dim: int = 4096
    """Width of the two FC layers before the embedding (VGGish's own sizes)."""
    dropout: float = 0.2
    """Dropout after each hidden FC layer (Fig. 2 shows dropout; the rate is ours)."""

    def __post_init__(self) -> None:
        if self.embedding_dim < 1 or self.hidden_dim < 1:
            raise ValueError("VGGishConfig: embedding_dim and hidden_dim must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VGGishConfig.dropout must be in [0, 1), got {self.dropout}")


class AudioOutput(NamedTuple):
    embedding: torch.Tensor
    prediction: torch.Tensor


# torchvggish's `features` indices: conv at 0, 3, 6, 8, 11, 13; pools at 2, 5, 10, 15.
# The paper drops the last conv (13) and last pool (15) for global average pooling.
_CONV_PLAN = ((1, 64), "M", (64, 128), "M", (128, 256), (256, 256), "M", (256, 512))
CONV_CHANNELS = 512


def _vggish_convs() -> nn.Sequential:
    layers: list[nn.Module] = []
    for step in _CONV_PLAN:
        if step == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(step[0], step[1], 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class VGGishEmotion(nn.Module):
    """The paper's modified VGGish (Fig. 2, Algorithm 2) for one affect dimension.

    Built from a :class:`VGGishConfig` or its fields. Input: log-mel ``[B,1,T,128]`` from :func:`aver.audio.log_mel` (T=480 by default, 40 ms hop).
    ``forward`` returns ``AudioOutput(embedding [B,128], prediction [B] in (-1,1))``;
    ``frame_features`` keeps time for fusion: ``[B,T//8,128]``, one step per 8 mel frames.
    ``forward(x, after="features")`` takes the conv stack's output instead of log-mel (training on
    a cached frozen conv stack); ``prefix("features")`` is that stack.
    """

    stages = ("features",)

    config_class = VGGishConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.config = c = take_config(VGGishConfig, args, kwargs)
        self.features = _vggish_convs()
        self.embeddings = nn.Sequential(
            nn.Linear(CONV_CHANNELS, c.hidden_dim), nn.ReLU(inplace=True), nn.Dropout(c.dropout),
            nn.Linear(c.hidden_dim, c.hidden_dim), nn.ReLU(inplace=True), nn.Dropout(c.dropout),
            nn.Linear(c.hidden_dim, c.embedding_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(c.embedding_dim, 1)

    @staticmethod
    def preprocess(mel) -> torch.Tensor:
        """Log-mel ``[B,T,128]`` (from :func:`aver.audio.log_mel`) -> ``[B,1,T,128]``, channels_last."""
        return torch.as_tensor(mel).float().unsqueeze(1).contiguous(memory_format=torch.channels_last)

    def prefix(self, until: str) -> nn.Module:
        if until not in self.stages:
            raise ValueError(f"VGGishEmotion can be cut after {self.stages}, not {until!r}")
        return self.features

    def forward(self, mel: torch.Tensor, *, after: str | None = None) -> AudioOutput:
        if after is not None and after not in self.stages:
            raise ValueError(f"VGGishEmotion can be cut after {self.stages}, not {after!r}")
        x = mel if after else self.features(mel)
        x = x.mean(dim=(2, 3))  # global average pool over time and frequency
        emb = self.embeddings(x)
        return AudioOutput(emb, torch.tanh(self.head(emb)).squeeze(-1))

    def frame_features(self, mel: torch.Tensor) -> torch.Tensor:
        """Embeddings per time step ``[B,T//8,embedding_dim]`` (pooled over frequency only)."""
        x = self.features(mel).mean(dim=3).transpose(1, 2)  # [B, T', 512]
        return self.embeddings(x)

    @classmethod
    def from_audioset(cls, uri: str = "vggish-audioset", *, sha256: str | None = None,
                      storage_options: dict | None = None, **kwargs) -> "VGGishEmotion":
        """A network whose conv stack holds AudioSet VGGish weights (torchvggish layout)."""
        model = cls(**kwargs)
        state = load_state_dict(uri, sha256=sha256, storage_options=storage_options)
        wanted = model.features.state_dict().keys()
        missing = [f"features.{k}" for k in wanted if f"features.{k}" not in state]
        if missing:
            raise ValueError(f"not a torchvggish VGGish state dict: missing {missing[:3]}")
        model.features.load_state_dict({k: state[f"features.{k}"] for k in wanted})
        return model
