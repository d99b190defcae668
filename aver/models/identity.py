"""Who a face is, for linking face tracks across misses and cuts (not one of the paper's networks)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aver.models._base import import_torchvision
from aver.models.weights import load_facenet


class IdentityNet(nn.Module):
    """facenet-pytorch's whole InceptionResnetV1 (VGGFace2 weights: registry ``facenet-vggface2``):
    a unit-length 512-d identity embedding after ``last_bn`` of a 160 px face. The teachers keep only
    its trunk and the student learns expressions with identity factored out, so neither tells people
    apart; this does, at one more forward per face."""

    input_size = 160
    embedding_dim = 512

    def __init__(self) -> None:
        import_torchvision()
        from facenet_pytorch import InceptionResnetV1

        super().__init__()
        self.net = InceptionResnetV1(pretrained=None, classify=False)

    @classmethod
    def from_weights(cls, uri: str = "facenet-vggface2", *, sha256: str | None = None,
                     storage_options: dict | None = None) -> "IdentityNet":
        """The network with a facenet-pytorch state dict (registry name or any URI); its classifier
        layer, if present, is not used."""
        model = cls()
        load_facenet(model.net, uri, sha256=sha256, storage_options=storage_options)
        return model.eval()

    @classmethod
    def preprocess(cls, crops: list[np.ndarray], device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 RGB face crops (HxWx3 arrays of any square size, or a ``[B,3,H,W]`` tensor) -> float
        ``[B,3,160,160]``, facenet standardisation."""
        if isinstance(crops, torch.Tensor):
            x = crops.to(device).float()
        else:
            x = torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2).float()
        if x.shape[-1] != cls.input_size:
            x = F.interpolate(x, size=(cls.input_size, cls.input_size), mode="bilinear", align_corners=False)
        return (x - 127.5) / 128.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x).float(), dim=1)

    @torch.inference_mode()
    def embed(self, crops: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Identity embeddings ``[N, 512]`` float32 of uint8 RGB face crops."""
        device = next(self.parameters()).device
        out = [self(self.preprocess(crops[s:s + batch_size], device)).cpu().numpy()
               for s in range(0, len(crops), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)
