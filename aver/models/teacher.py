from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from aver.models._base import crops_to_batch, import_torchvision, take_config
from aver.models.weights import load_facenet


@dataclass
class TeacherConfig:
    d_face: int = 128
    """Width of the face embedding after the last 1x1 conv (the paper trains 128 and 256)."""
    fec_dim: int = 32
    """Output size of the FEC triplet head."""
    num_classes: int = 8
    """AffectNet classes (0-7)."""
    dense_layers: int = 5
    """Layers in the DenseNet block after the trunk."""
    growth_rate: int = 64
    """Channels each dense layer adds."""

    def __post_init__(self) -> None:
        for name in ("d_face", "fec_dim", "num_classes", "dense_layers", "growth_rate"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TeacherConfig.{name} must be a positive int, got {getattr(self, name)!r}")


class FaceOutput(NamedTuple):
    embedding: torch.Tensor
    fec: torch.Tensor
    affectnet: torch.Tensor


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _DenseLayer(nn.Module):
    # BN-ReLU-1x1 (bottleneck 4k) - BN-ReLU-3x3 (k), as in Huang et al. 2017.
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def _facenet_trunk() -> nn.Sequential:
    # facenet-pytorch's InceptionResnetV1 up to mixed_7a (the paper's "Inception 4e" output,
    # 1792x3x3 at 140 px). Module names are kept so upstream state-dict keys load as they are.
    import_torchvision()
    from facenet_pytorch import InceptionResnetV1

    full = InceptionResnetV1(pretrained=None, classify=False)
    names = ["conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a",
             "conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a"]
    return nn.Sequential(OrderedDict((n, getattr(full, n)) for n in names))


class Teacher(nn.Module):
    """The paper's teacher (Fig. 1): a FaceNet trunk, a dense block and two output heads.

    Built from a :class:`TeacherConfig` (``Teacher(TeacherConfig(d_face=256))``) or its fields
    (``Teacher(d_face=256)``). Input: float ``[B,3,140,140]`` RGB with facenet standardisation
    ``(x - 127.5) / 128``, which :meth:`preprocess` makes of uint8 crops.
    Returns ``FaceOutput(embedding [B,d_face], fec [B,32], affectnet [B,8] logits)``.
    Submodules in order: ``trunk`` (1792x3x3), ``reduce`` (512), ``dense`` (832),
    ``project`` (d_face), then global average pooling and the heads ``fec_head``, ``affectnet_head``.
    ``forward(x, after="trunk")`` takes the trunk's output instead of images (training on a cached
    frozen trunk); ``prefix("trunk")`` is that frozen part.
    """

    stages = ("trunk",)

    config_class = TeacherConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.config = c = take_config(TeacherConfig, args, kwargs)
        self.trunk = _facenet_trunk()
        self.reduce = _conv_bn_relu(1792, 512)
        self.dense = nn.Sequential(*[_DenseLayer(512 + i * c.growth_rate, c.growth_rate) for i in range(c.dense_layers)])
        self.project = _conv_bn_relu(512 + c.dense_layers * c.growth_rate, c.d_face)
        self.fec_head = nn.Linear(c.d_face, c.fec_dim)
        self.affectnet_head = nn.Linear(c.d_face, c.num_classes)

    @staticmethod
    def preprocess(images, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 RGB crops -> float ``[B,3,140,140]`` with facenet standardisation, channels_last."""
        x = (crops_to_batch(images, device).float() - 127.5) / 128.0
        return x.contiguous(memory_format=torch.channels_last)

    def prefix(self, until: str) -> nn.Module:
        if until not in self.stages:
            raise ValueError(f"a teacher can be cut after {self.stages}, not {until!r}")
        return self.trunk

    def forward(self, x: torch.Tensor, *, after: str | None = None) -> FaceOutput:
        if after is None:
            x = self.trunk(x)
        elif after not in self.stages:
            raise ValueError(f"a teacher can be cut after {self.stages}, not {after!r}")
        x = self.project(self.dense(self.reduce(x)))
        emb = x.mean(dim=(2, 3))
        return FaceOutput(emb, self.fec_head(emb), self.affectnet_head(emb))

    @classmethod
    def from_facenet(cls, uri: str = "facenet-vggface2", *, sha256: str | None = None,
                     storage_options: dict | None = None, **kwargs) -> "Teacher":
        """A teacher whose trunk holds facenet-pytorch VGGFace2 weights (registry name or any URI);
        ``kwargs`` are :class:`TeacherConfig` fields."""
        model = cls(**kwargs)
        load_facenet(model.trunk, uri, sha256=sha256, storage_options=storage_options)
        return model
