"""Model checkpoints: config and state dict together, so a checkpoint alone rebuilds its model."""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from aver.io.storage import read_bytes, redact, write_bytes_atomic
from aver.models.fusion import FusionModel
from aver.models.student import Student
from aver.models.teacher import Teacher
from aver.models.vggish import VGGishEmotion

FORMAT = "aver-checkpoint/1"


ARCHITECTURES: dict[str, type[nn.Module]] = {c.__name__: c for c in (Teacher, Student, VGGishEmotion, FusionModel)}

def save_checkpoint(model: nn.Module, uri: str, *, meta: dict[str, Any] | None = None,
                    storage_options: dict | None = None) -> None:
    """Write ``model`` (architecture name, config, float32 state dict, ``meta``) to ``uri`` atomically."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
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
    cls = ARCHITECTURES.get(payload["architecture"])
    if cls is None:
        raise ValueError(f"{redact(uri)}: unknown architecture {payload['architecture']!r}")
    with skip_init():
        model = cls(cls.config_class(**payload["config"]))
    try:
        model.load_state_dict(payload["state_dict"])  # strict: every parameter and buffer is overwritten
    except RuntimeError as e:  # e.g. a fusion model saved before its visual input was standardised
        raise ValueError(f"{redact(uri)}: this {payload['architecture']} was saved by an aver whose layers "
                         f"differ from this one's; train it again with this version ({str(e).splitlines()[0]})") from None
    return model.eval(), payload.get("meta", {})


@contextmanager
def skip_init():
    """``torch.nn.init``'s initialisers as no-ops while a model that is about to receive a whole
    state dict is built: DenseNet201's random init alone costs ~1.2 CPU-s in every actor and
    worker that loads a student. Only for models whose ``load_state_dict`` follows (strict)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)
