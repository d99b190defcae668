"""Frozen-prefix outputs cached on storage, shared by every run (and evaluate) that freezes the
same prefix of the same network."""

from __future__ import annotations

import io
import os
from typing import Callable

import torch

from aver.io.parts import join
from aver.io.storage import url_to_fs, write_bytes_atomic


class PrefixStore:
    """Frozen-prefix outputs shared by the runs of one output folder, looked up by image content.

    Runs that freeze the same prefix see the same images: both teachers' FaceNet trunk, the
    distilled and the non-distilled student's DenseNet up to the same stage. The second run reads
    what the first computed instead of recomputing it. The folder is named by a hash of the
    prefix's weights and buffers and of the preprocessing, so a different prefix never reads
    another's outputs; entries are keyed by a hash of the image itself, so a changed file is a
    miss, not a stale hit. Each worker adds one part file (written atomically) per data source."""

    def __init__(self, folder: str, part: str, storage_options: dict | None = None) -> None:
        self.folder, self.part, self.so = folder, part, storage_options
        self.rows: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        self.saved = 0
        fs, path = url_to_fs(folder, storage_options)
        fs.invalidate_cache()
        if fs.exists(path):
            for p in sorted(fs.ls(path, detail=False)):
                if p.endswith(".pt") and not os.path.basename(p).startswith("."):
                    with fs.open(p, "rb") as f:
                        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
                    self.rows.update(zip(state["keys"], state["values"]))

    @staticmethod
    def key(image) -> str:
        import hashlib

        import numpy as np

        a = np.ascontiguousarray(image)
        return hashlib.sha1(f"{a.shape}{a.dtype}".encode() + a.tobytes()).hexdigest()

    def encode(self, images, encode: Callable) -> torch.Tensor:
        """float16 CPU prefix outputs of ``images``: stored ones read, the others computed with
        ``encode`` and kept for :meth:`save`."""
        keys = [self.key(im) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        if missing:
            for i, row in zip(missing, encode(images[missing]).half().cpu()):
                self.rows[keys[i]] = self.new[keys[i]] = row
        out = torch.stack([self.rows[k] for k in keys])
        # stack gives NCHW; the models run channels_last (prepare_worker), 2.4x faster on CPU
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out

    def save(self) -> None:
        """Write the entries computed since the last save as one part."""
        if not self.new:
            return
        buf = io.BytesIO()
        torch.save({"keys": list(self.new), "values": torch.stack(list(self.new.values()))}, buf)
        write_bytes_atomic(join(self.folder, f"{self.part}-{self.saved}.pt"), buf.getvalue(), self.so)
        self.saved += 1
        self.new = {}


def prefix_store_folder(output: str, core: torch.nn.Module, freeze: str, preprocess: Callable) -> str:
    """OUTPUT/cache/prefix-<hash>: the :class:`PrefixStore` of ``core`` frozen up to ``freeze``,
    named by the prefix's weights and buffers and the preprocessing."""
    import hashlib

    h = hashlib.sha256(f"{type(core).__name__}.{freeze}:{preprocess.__module__}.{preprocess.__qualname__}".encode())
    for name, value in core.prefix(freeze).state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return join(output, "cache", f"prefix-{h.hexdigest()[:16]}")
