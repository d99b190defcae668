"""Known pretrained weights (URL + sha256 + preprocessing) and checked loading from any URI.

Nothing here downloads implicitly: a registry name resolves to a file in the weights folder
(``$AVER_WEIGHTS_DIR``, default ``~/.cache/aver/weights``), and a missing file is an error that
says where to fetch it from. Every file is loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field

import torch

from aver.io.storage import exists, read_bytes, redact, write_bytes_atomic


@dataclass(frozen=True)
class WeightsEntry:
    """One upstream checkpoint: where it lives, how to verify it, and how its inputs look."""

    name: str
    """Registry key."""
    url: str
    """Upstream download URL."""
    sha256: str | None
    """Full sha256 hex digest, or the prefix upstream publishes in the file name; None if unknown."""
    layout: str
    """Whose state-dict layout the file has."""
    preprocessing: dict = field(default_factory=dict)
    """What the network expects as input (size, colour order, normalisation)."""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


WEIGHTS: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            name="facenet-vggface2",
            url="https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
            sha256=None,  # upstream publishes no digest; pass sha256= to pin the file you fetched
            layout="facenet-pytorch InceptionResnetV1 state dict",
            preprocessing={"size": 140, "color": "RGB", "scale": "(x - 127.5) / 128"},
        ),
        WeightsEntry(
            name="densenet201-imagenet",
            url="https://download.pytorch.org/models/densenet201-c1103571.pth",
            sha256="c1103571",  # torchvision's DenseNet201_Weights.IMAGENET1K_V1 (hash prefix in name)
            layout="torchvision DenseNet201 state dict (legacy 'norm.1' keys)",
            preprocessing={"size": 140, "color": "RGB", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        ),
        WeightsEntry(
            name="vggish-audioset",
            url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
            sha256="10086976",  # torchvggish release (hash prefix in name)
            layout="torchvggish VGGish: features.{0,3,6,8,11,13}, embeddings.{0,2,4}",
            preprocessing={"sample_rate": 16000, "frontend": "aver.audio.log_mel"},
        ),
    )
}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when ``a`` and ``b`` hold equal parameters and buffers under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def weights_dir() -> str:
    return os.path.expanduser(os.environ.get("AVER_WEIGHTS_DIR", "~/.cache/aver/weights"))


def resolve(uri_or_name: str) -> tuple[str, str | None]:
    """The URI to read and the expected sha256 (or prefix) for a registry name or any URI."""
    entry = WEIGHTS.get(uri_or_name)
    if entry is None:
        return uri_or_name, None
    path = os.path.join(weights_dir(), entry.filename)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"weights '{entry.name}' are not in {weights_dir()}: fetch them with\n"
            f"  curl -L {entry.url} -o {path}\n"
            f"or pass the checkpoint's own path or URI (local, s3://...) instead of the name."
        )
    return path, entry.sha256


def _checked(uri: str, data: bytes, expected: str) -> bytes:
    """``data`` once its sha256 starts with ``expected`` (no check when empty)."""
    digest = hashlib.sha256(data).hexdigest() if expected else ""
    if not digest.startswith(expected.lower()):
        raise ValueError(f"sha256 mismatch for {redact(uri)}: expected {expected}..., got {digest}; "
                         "the file is corrupt or not the checkpoint named")
    return data


def ship(uri_or_name: str, folder: str, storage_options: dict | None = None) -> str:
    """Where workers on any node read ``uri_or_name``: a registry name is resolved here (the
    driver's weights folder), its sha256 checked, and the file copied once into ``folder`` on the
    job's storage; any other URI is returned as it is. On a cluster a registry name resolved by
    each worker would read each node's own cache."""
    if uri_or_name not in WEIGHTS:
        return uri_or_name
    path, expected = resolve(uri_or_name)
    target = f"{folder.rstrip('/')}/{os.path.basename(path)}"
    if not exists(target, storage_options):
        write_bytes_atomic(target, _checked(path, read_bytes(path), expected or ""), storage_options)
    return target


def load_state_dict(
    uri_or_name: str, *, sha256: str | None = None, storage_options: dict | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a registry name or URI, verify its sha256 when one is known."""
    uri, known = resolve(uri_or_name)
    expected = (sha256 or known or "").lower()
    data = _checked(uri, read_bytes(uri, storage_options), expected)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - say which file, never retry with full unpickling
        raise ValueError(f"{redact(uri)} is not a weights-only torch checkpoint: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{redact(uri)} holds a {type(state).__name__}, not a state dict")
    return state


def load_facenet(module: torch.nn.Module, uri: str, *, sha256: str | None = None,
                 storage_options: dict | None = None) -> None:
    """Load into ``module`` (facenet-pytorch's InceptionResnetV1, or a part of it) its entries of
    the facenet state dict at ``uri`` (registry name or any URI; the file may hold more, as the
    released one holds a classifier)."""
    state = load_state_dict(uri, sha256=sha256, storage_options=storage_options)
    wanted = module.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"not a facenet-pytorch InceptionResnetV1 state dict: missing {missing[:3]}...")
    module.load_state_dict({k: state[k] for k in wanted})
