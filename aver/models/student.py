from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aver.constants import DISTILL_DIM
from aver.models._base import crops_to_batch, import_torchvision, take_config
from aver.models.weights import load_state_dict, same_weights


@dataclass
class StudentConfig:
    fec_dim: int = 32
    """Output size of the FEC triplet head."""
    num_classes: int = 8
    """AffectNet classes (0-7)."""
    distill_dim: int = DISTILL_DIM
    """Size of the distillation head: [t1.fec, t1.affectnet, t2.fec, t2.affectnet]."""

    def __post_init__(self) -> None:
        for name in ("fec_dim", "num_classes", "distill_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"StudentConfig.{name} must be a positive int, got {getattr(self, name)!r}")


class StudentOutput(NamedTuple):
    embedding: torch.Tensor
    fec: torch.Tensor
    affectnet: torch.Tensor
    distill: torch.Tensor


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's ImageNet DenseNet checkpoints still use 'norm.1'-style keys.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class Student(nn.Module):
    """The distilled student (paper §3.1.2): torchvision DenseNet201 with three heads.

    Built from a :class:`StudentConfig` or its fields. Input: float ``[B,3,H,W]`` RGB with ImageNet
    normalisation (140 px crops in the paper), which :meth:`preprocess` makes of uint8 crops.
    Returns ``StudentOutput(embedding [B,1920], fec [B,32], affectnet [B,8], distill [B,80])``.
    ``forward(x, after=STAGE)`` takes the output of the backbone stage ``STAGE`` (one of ``stages``,
    e.g. ``"transition3"``) instead of images, for training on a cached frozen prefix;
    ``prefix(STAGE)`` is that frozen part.
    """

    embedding_dim = 1920
    stages = ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
              "denseblock3", "transition3", "denseblock4", "norm5")

    config_class = StudentConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        import_torchvision()
        from torchvision.models import densenet201

        self.config = c = take_config(StudentConfig, args, kwargs)
        self.backbone = densenet201(weights=None)
        self.backbone.classifier = nn.Identity()  # backbone(x) is the pooled 1920-d feature
        self.fec_head = nn.Linear(self.embedding_dim, c.fec_dim)
        self.affectnet_head = nn.Linear(self.embedding_dim, c.num_classes)
        self.distill_head = nn.Linear(self.embedding_dim, c.distill_dim)

    @staticmethod
    def preprocess(images, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 RGB crops -> float ``[B,3,140,140]`` with ImageNet normalisation, channels_last."""
        x = crops_to_batch(images, device).float() / 255.0
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def _stage_index(self, stage: str) -> int:
        if stage not in self.stages:
            raise ValueError(f"unknown student stage {stage!r}; one of {self.stages}")
        return self.stages.index(stage) + 1

    def prefix(self, until: str) -> nn.Module:
        return self.backbone.features[:self._stage_index(until)]

    def shared_stage(self, other: "Student") -> str | None:
        """The deepest backbone stage up to which ``other`` has the same weights and buffers (students
        trained from one initialisation with the same frozen prefix): evaluating both can run that
        prefix once. None when the first stage already differs."""
        shared = None
        for stage, mine, theirs in zip(self.stages, self.backbone.features, other.backbone.features):
            if not same_weights(mine, theirs):
                break
            shared = stage
        return shared

    def forward(self, x: torch.Tensor, *, after: str | None = None) -> StudentOutput:
        x = self.backbone.features[self._stage_index(after) if after else 0:](x)
        emb = torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1)  # torchvision DenseNet.forward
        return StudentOutput(emb, self.fec_head(emb), self.affectnet_head(emb), self.distill_head(emb))

    @classmethod
    def from_imagenet(cls, uri: str = "densenet201-imagenet", *, sha256: str | None = None,
                      storage_options: dict | None = None, **kwargs) -> "Student":
        """A student whose backbone holds torchvision's ImageNet DenseNet201 weights."""
        model = cls(**kwargs)
        state = load_state_dict(uri, sha256=sha256, storage_options=storage_options)
        renamed = {}
        for key, value in state.items():
            m = _LEGACY_KEY.match(key)
            renamed[m.group(1) + m.group(2) if m else key] = value
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
        missing, unexpected = model.backbone.load_state_dict(renamed, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"not a torchvision DenseNet201 state dict: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return model
