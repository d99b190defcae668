"""Model checkpoints: config and state dict together, so a checkpoint alone rebuilds its model."""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from aver.storage import read_bytes, redact, write_bytes_atomic

FORMAT = "aver-checkpoint/1"


def _architectures() -> dict[str, type[nn.Module]]:
    from aver.models.fusion import FusionModel
    from aver.models.student import Student
    from aver.models.teacher import Teacher
    from aver.models.vggish import VGGishEmotion

    return {c.__name__: c for c in (Teacher, Student, VGGishEmotion, FusionModel)}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """True when ``a`` and ``b`` hold equal parameters and buffers under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def save_checkpoint(model: nn.Module, uri: str, *, meta: dict[str, Any] | None = None,
                    storage_options: dict | None = None) -> None:
    """Write ``model`` (architecture name, config, float32 state dict, ``meta``) to ``uri`` atomically."""
    name = type(model).__name__
    if name not in _architectures():
        raise TypeError(f"save_checkpoint takes an aver model, got {name}")
    config = asdict(model.config)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    payload = {
        "format": FORMAT,
        "architecture": name,
        "config": config,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(uri, buf.getvalue(), storage_options)


def load_checkpoint(uri: str, *, storage_options: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model saved at ``uri`` (in eval mode) and its ``meta``; loads with ``weights_only=True``."""
    try:
        payload = torch.load(io.BytesIO(read_bytes(uri, storage_options)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{redact(uri)} is not an aver checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{redact(uri)} is not an aver checkpoint (format {FORMAT})")
    cls = _architectures().get(payload["architecture"])
    if cls is None:
        raise ValueError(f"{redact(uri)}: unknown architecture {payload['architecture']!r}")
    config = dict(payload["config"])
    positional = {"Teacher": ["d_face"], "FusionModel": ["visual_dim", "audio_dim"]}.get(cls.__name__, [])
    args = [config.pop(k) for k in positional]
    model = cls(*args, **config)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload.get("meta", {})
