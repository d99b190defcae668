"""What the four networks share: building from a config, and turning crops into input batches."""

from __future__ import annotations

import sys
import types
from dataclasses import fields
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from aver.constants import CROP_SIZE
from aver.io.media import resize_crops

C = TypeVar("C")


def import_torchvision() -> None:
    """Import torchvision (which facenet-pytorch imports) without ``torch._dynamo``. torchvision
    0.26's ``ops/roi_align.py`` imports ``torch._dynamo.utils`` at module level for one check inside
    ``roi_align``, and ``import torchvision`` imports every op: +1.5 CPU-s in every process that
    builds a model (torch itself keeps dynamo out of ``import torch``). The check is served lazily:
    roi_align's first call imports dynamo, nothing else does."""
    if "torchvision" in sys.modules or "torch._dynamo.utils" in sys.modules:
        return

    def is_compile_supported(device_type: str) -> bool:
        from torch._dynamo.utils import is_compile_supported as real  # the real module, on first use

        return real(device_type)

    stand_in = types.ModuleType("torch._dynamo.utils")
    stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    sys.modules["torch._dynamo.utils"] = stand_in  # found there, its package is never imported
    try:
        import torchvision  # noqa: F401
    finally:
        del sys.modules["torch._dynamo.utils"]


def take_config(config_class: type[C], args: tuple, kwargs: dict) -> C:
    """``Model(config)`` or ``Model(*fields, **fields)``: the config either way, checked by its class."""
    if len(args) == 1 and not kwargs and isinstance(args[0], config_class):
        return args[0]
    if any(isinstance(a, config_class) for a in args):
        raise TypeError(f"pass a {config_class.__name__} alone, or its fields, not both")
    names = [f.name for f in fields(config_class)]
    if len(args) > len(names):
        raise TypeError(f"{config_class.__name__} has {len(names)} fields, got {len(args)} positional values")
    return config_class(**dict(zip(names, args)), **kwargs)


def crops_to_batch(images, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 RGB crops (``[B,H,W,3]`` array or a list of HxWx3, or a ``[B,3,H,W]`` tensor already
    on a device: the detector's crops) -> uint8 ``[B,3,140,140]`` on ``device`` (through pinned
    memory on CUDA); crops of another size are resized first."""
    if isinstance(images, torch.Tensor):
        x = images.to(device) if device is not None else images
        return resize_faces(x, CROP_SIZE) if x.shape[-2:] != (CROP_SIZE, CROP_SIZE) else x
    x = torch.as_tensor(resize_crops(images)).permute(0, 3, 1, 2)
    device = torch.device(device) if device is not None else x.device
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def resize_faces(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B,3,H,W]`` uint8 -> ``[B,3,size,size]`` uint8, bilinear and antialiased when shrinking as
    PIL's BILINEAR is (torch's uint8 kernel on the CPU matches it exactly; on a GPU it runs in
    float, within 1 of it)."""
    if images.device.type == "cpu":
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def autocast(device: torch.device, enabled: bool | None = None):
    """bf16 autocast on CUDA (the GPU stages' precision); off on CPU, where bf16 is slower, unless
    ``enabled`` says otherwise."""
    on = device.type == "cuda" if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device, through pinned memory and an asynchronous copy on CUDA."""
    if x.device == device or device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
