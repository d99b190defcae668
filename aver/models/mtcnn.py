"""MTCNN (Zhang et al. 2016) with facenet-pytorch's networks and weights, every stage batched on
the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aver.models._base import import_torchvision

REFINE_BATCH = 512
"""Candidates per R-/O-Net forward (upstream's chunk: bounds the memory of a crowded batch)."""


class MTCNN(nn.Module):
    """The face detector the paper uses (facenet-pytorch's P-, R- and O-Nets and their shipped
    weights), run over a batch of equal-size images without leaving the device. Upstream's
    ``detect_face`` crops and resizes every candidate box one ``interpolate`` call at a time and
    goes through the host between stages; here each refine stage cuts and resamples all candidates
    of the batch at once, by the same area averaging (exactly: sums from integral images over the
    bins ``adaptive_avg_pool2d`` uses), NMS stays on the device (O-Net's last one with upstream's
    'Min' overlap), and :meth:`forward` returns tensors on the device: nothing in a call waits for
    the host.

    ``forward(images)`` takes ``[N,3,H,W]`` RGB pixel values (0-255, uint8 or float) and returns
    ``(boxes [M,4], probs [M], image_index [M])`` (x1, y1, x2, y2 in the images' pixels, best first
    within an image)."""

    def __init__(self, min_face_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709) -> None:
        super().__init__()
        import_torchvision()
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.min_face_size, self.thresholds, self.factor = min_face_size, tuple(thresholds), factor
        self.eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from facenet_pytorch.models.utils.detect_face import bbreg, rerec
        from torchvision.ops import batched_nms

        # planar before the pyramid: area resampling of channels-last frames is 1.5x slower on CPU
        pixels = images.contiguous().to(next(self.parameters()).dtype)
        sums = _integral(images)
        boxes, index = self._propose(pixels)
        # R-Net: keep, NMS per image, regress, square
        boxes, index, reg = self._refine(self.rnet, sums, boxes, index, 24, self.thresholds[1])
        keep = batched_nms(boxes[:, :4], boxes[:, 4], index, 0.7)
        boxes = rerec(bbreg(boxes[keep], reg[keep]))
        index = index[keep]
        # O-Net: keep, regress, NMS per image with the smaller box's area as the overlap
        boxes, index, reg = self._refine(self.onet, sums, boxes, index, 48, self.thresholds[2])
        boxes = bbreg(boxes, reg)
        keep = _nms_min(boxes[:, :4], boxes[:, 4], index, 0.7)
        return boxes[keep, :4], boxes[keep, 4], index[keep]

    def _propose(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the image pyramid: candidate squares ``[K,5]`` (box, score) and their images."""
        from facenet_pytorch.models.utils.detect_face import generateBoundingBox, rerec
        from torchvision.ops import batched_nms

        h, w = pixels.shape[2:]
        scale = 12.0 / self.min_face_size
        side = min(h, w) * scale
        found, owners = [], []
        while side >= 12:  # upstream's pyramid, the same float steps
            x = F.interpolate(pixels, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            # channels-last, here and for R- and O-Net: their convolutions and pooling run ~2x faster on CPU
            reg, probs = self.pnet(((x - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last))
            boxes, index = generateBoundingBox(reg, probs[:, 1], scale, self.thresholds[0])
            keep = batched_nms(boxes[:, :4], boxes[:, 4], index, 0.5)
            found.append(boxes[keep])
            owners.append(index[keep])
            scale, side = scale * self.factor, side * self.factor
        if not found:
            return pixels.new_zeros((0, 5)), torch.zeros(0, dtype=torch.long, device=pixels.device)
        boxes, index = torch.cat(found), torch.cat(owners)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], index, 0.7)
        boxes, index = boxes[keep], index[keep]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                             boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]], dim=1)
        return rerec(boxes), index

    def _refine(self, net: nn.Module, sums: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, size: int,
                threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``net`` on every candidate at once: the candidates it scores above ``threshold`` as
        ``[K,5]`` (box, its score), their images, and their box regressions."""
        if not len(boxes):
            return boxes[:, :5], index, boxes[:, :4]
        x, inside = _area_crops(sums, boxes, index, size)
        x = ((x - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last)
        outs = [torch.cat(o) for o in zip(*(net(x[s:s + REFINE_BATCH]) for s in range(0, len(x), REFINE_BATCH)))]
        reg, score = outs[0], outs[-1][:, 1]  # R-Net gives (reg, probs), O-Net (reg, landmarks, probs)
        keep = (score > threshold) & inside
        return torch.cat([boxes[keep, :4], score[keep, None]], dim=1), index[keep], reg[keep]


def _integral(images: torch.Tensor) -> torch.Tensor:
    """``[N,3,H+1,W+1]`` int32 sums of the pixels above and left of each corner (exact: a 4K frame's
    total is under 2**31)."""
    n, c, h, w = images.shape
    sums = images.new_empty((n, c, h + 1, w + 1), dtype=torch.int32)
    sums[:, :, 0], sums[:, :, :, 0] = 0, 0
    sums[:, :, 1:, 1:] = images
    return sums.cumsum_(2).cumsum_(3)  # in place: 3x faster than cumsum's copies and a pad on CPU


def _area_crops(sums: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each box's pixels (as upstream cuts them: truncated to integers, clipped to the image)
    area-resampled to ``size`` x ``size``: ``[K,3,size,size]`` float, and whether the box holds a
    pixel at all. Output bin i of an n-pixel side spans [floor(i n / size), ceil((i+1) n / size)),
    as ``adaptive_avg_pool2d`` (``interpolate(mode="area")``) has it."""
    n_img, _, h1, w1 = sums.shape
    corners = boxes[:, :4].trunc().to(torch.long)
    x0 = corners[:, 0].clamp(min=1) - 1
    y0 = corners[:, 1].clamp(min=1) - 1
    x1 = corners[:, 2].clamp(max=w1 - 1)
    y1 = corners[:, 3].clamp(max=h1 - 1)
    inside = (x1 > x0) & (y1 > y0)
    nx, ny = (x1 - x0).clamp(min=1)[:, None], (y1 - y0).clamp(min=1)[:, None]
    i = torch.arange(size, device=sums.device)
    xs, xe = x0[:, None] + i * nx // size, x0[:, None] + ((i + 1) * nx + size - 1) // size
    ys, ye = y0[:, None] + i * ny // size, y0[:, None] + ((i + 1) * ny + size - 1) // size
    plane = (index[:, None] * 3 + torch.arange(3, device=sums.device)) * (h1 * w1)  # [K,3]
    flat = sums.reshape(-1)

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return flat.take(plane[:, :, None, None] + (rows * w1)[:, None, :, None] + cols[:, None, None, :])

    total = at(ye, xe) - at(ys, xe) - at(ye, xs) + at(ys, xs)
    # sum / rows / cols, in that order, as the pooling kernel divides
    out = total.float() / (ye - ys)[:, None, :, None].float() / (xe - xs)[:, None, None, :].float()
    return out, inside


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, index: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS within each image, overlap = intersection / the smaller area (upstream's 'Min'
    criterion, with its +1 pixel areas): indices kept, best first. The overlap matrix is built at
    once; the greedy pass over it is one small device step per box, with no host round trip."""
    order = scores.argsort(descending=True)
    b, owner = boxes[order], index[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    wide = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0]) + 1).clamp(min=0)
    tall = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1]) + 1).clamp(min=0)
    overlap = wide * tall / torch.minimum(area[:, None], area[None, :])
    n = len(b)
    later = torch.ones(n, n, dtype=torch.bool, device=b.device).triu(1)
    suppresses = (overlap > threshold) & later & (owner[:, None] == owner[None, :])
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    for k in range(n):
        keep &= ~(suppresses[k] & keep[k])
    return order[keep]
