"""Batches for the train loops: a worker's dataset shard turned into model inputs (optionally
through a frozen, cached prefix), and BatchNorm recalibration."""

from __future__ import annotations

from typing import Callable

import torch

from aver.data.prefix_store import PrefixStore, prefix_store_folder
from aver.io.streaming import trim_heap
from aver.models import autocast, to_device
from aver.train.harness import TrainConfig


def input_encoder(cfg: TrainConfig, core: torch.nn.Module, freeze: str | None, preprocess: Callable,
                  device: torch.device) -> tuple[Callable, PrefixStore | None]:
    """images (uint8 NHWC) -> model inputs: preprocessed on ``device`` and, when the model is frozen
    up to ``freeze``, run through that frozen prefix (in eval mode: its BN statistics stay).
    Returns the encoder and, with a frozen prefix, the run's :class:`PrefixStore` under
    OUTPUT/cache/ (None otherwise)."""
    if freeze:
        core.prefix(freeze).eval()

    def encode(images):
        x = to_device(preprocess(images), device)
        if not freeze:
            return x
        with torch.no_grad(), autocast(device):
            return core.prefix(freeze)(x).float()

    if not freeze:
        return encode, None
    import uuid

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    store = PrefixStore(prefix_store_folder(cfg.output, core, freeze, preprocess),
                        f"{cfg.name}-rank{rank}-{uuid.uuid4().hex[:8]}", cfg.storage_options or None)
    return encode, store


class ShardBatches:
    """Batches of a Ray Train dataset shard whose image columns are turned into model inputs by
    ``encode``: streamed afresh every pass (rows through a local shuffle buffer of ``shuffle_buffer``
    rows, seeded by the pass), or, with ``cache=True`` (``encode`` runs a frozen prefix), encoded once,
    kept in memory as float16 and permuted every pass. The cache is what makes a frozen-trunk recipe
    cheap: the prefix is most of the compute and its output never changes. With a ``store`` the
    encoded images are also read from / added to a :class:`PrefixStore`.

    A run's main source takes one pass an epoch (:meth:`epoch`); a secondary source beside it is one
    endless :meth:`stream` whose position carries over from epoch to epoch (and, counted in steps,
    into a resumed run), so each of its rows is used in turn, not the first ones of every epoch."""

    def __init__(self, shard, image_columns: tuple[str, ...], encode: Callable, batch_size: int, *,
                 cache: bool, seed: int, drop_last: bool = False, store: PrefixStore | None = None,
                 shuffle_buffer: int = 0, cache_bytes: int | None = None) -> None:
        self.shard, self.columns, self.encode, self.bs = shard, image_columns, encode, batch_size
        self.seed, self.cached, self.drop_last, self.store = seed, None, drop_last, store
        self.cache_bytes = cache_bytes
        """The most the cache keeps in this process's heap; a larger one goes to a memory-mapped
        file on the node's local disk (None: no limit)."""
        self.order = None
        """The cached rows in the order of their content (their positions in the cache)."""
        self.shuffle_buffer = max(shuffle_buffer, 4 * batch_size)
        self.pass_length = 0
        """Batches in the last pass started (known once it ended)."""
        if cache:
            self.cached = self._encode_all()
            if store is not None:
                store.save()
            trim_heap()  # the prefix's activations of every batch are freed; keep only the cache

    @torch.no_grad()
    def _encode_all(self) -> dict:
        """The shard encoded, its rows in the order of their content: the order they streamed in
        depends on task timing, and a run resumed after a failure must permute the same rows the
        same way as the run it continues."""
        import hashlib

        import numpy as np

        parts: dict[str, list] = {}
        keys: list[bytes] = []
        encoded = _Cache(self.cache_bytes)
        for b in self.shard.iter_batches(batch_size=64, batch_format="numpy"):
            for i in range(len(next(iter(b.values())))):
                h = hashlib.sha1()
                for k in sorted(b):
                    h.update(np.ascontiguousarray(b[k][i]).tobytes() if k in self.columns else repr(b[k][i]).encode())
                keys.append(h.digest())
            for k, v in b.items():
                if k in self.columns:
                    encoded.add(k, self.store.encode(v, self.encode) if self.store is not None
                                else self.encode(v).half().cpu())
                else:
                    parts.setdefault(k, []).append(v)
        if not keys:
            raise RuntimeError("this worker's dataset shard is empty")
        # the rows stay where they were written; the content order is an index into them (no copy)
        self.order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))
        return {**encoded.tensors(), **{k: np.concatenate(v) for k, v in parts.items()}}

    @property
    def steps(self) -> int | None:
        """Batches a pass yields, when known: always when cached, once a pass ended when streamed."""
        if self.cached is not None:
            n = len(next(iter(self.cached.values())))
            return n // self.bs if self.drop_last else -(-n // self.bs)
        return self.pass_length or None

    def epoch(self, epoch: int, skip: int = 0):
        """Pass number ``epoch``, shuffled afresh (reproducibly when cached), from its ``skip``-th
        batch on (streamed: the skipped batches are read, not encoded)."""
        self.pass_length = 0
        if self.cached is None:
            for b in self.shard.iter_batches(batch_size=self.bs, batch_format="numpy", drop_last=self.drop_last,
                                             local_shuffle_buffer_size=self.shuffle_buffer,
                                             local_shuffle_seed=self.seed * 1000 + epoch):
                self.pass_length += 1
                if self.pass_length > skip:
                    yield {k: self.encode(v) if k in self.columns else v for k, v in b.items()}
            return
        n = len(next(iter(self.cached.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        end = len(order) - len(order) % self.bs if self.drop_last else len(order)
        self.pass_length = -(-end // self.bs)
        for s in range(skip * self.bs, end, self.bs):
            idx = self.order[order[s:s + self.bs]]
            yield {k: v[idx].float() if k in self.columns else v[idx.numpy()] for k, v in self.cached.items()}

    def stream(self, start: int = 0):
        """Endless batches over passes 0, 1, 2, ... (each reshuffled), from the ``start``-th batch of
        that sequence on: a resumed run gives the steps it has already trained."""
        pass_ = 0
        while True:
            yield from self.epoch(pass_, skip=start)
            if not self.pass_length:
                return  # an empty shard
            start = max(0, start - self.pass_length)
            pass_ += 1


class _Cache:
    """Encoded rows, column by column, as they are added: in the heap up to ``limit`` bytes, then
    all of them in files on the node's local disk, mapped into memory when done (the OS pages
    them in and out: the process's own memory stays at a batch, and no copy is made to read
    them in any order). The files are unlinked once mapped: a dead worker leaves none behind."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.held, self.chunks = limit, 0, {}
        self.folder: str | None = None
        self.files: dict[str, list] = {}  # column -> [file, row shape, dtype, rows]

    def add(self, column: str, x: torch.Tensor) -> None:
        if self.folder is not None:
            self._write(column, x)
            return
        self.chunks.setdefault(column, []).append(x)
        self.held += x.numel() * x.element_size()
        if self.limit is not None and self.held > self.limit:
            import tempfile

            self.folder = tempfile.mkdtemp(prefix="aver-cache-")
            for c, xs in self.chunks.items():
                for chunk in xs:
                    self._write(c, chunk)
            self.chunks = {}

    def _write(self, column: str, x: torch.Tensor) -> None:
        import os

        if column not in self.files:
            self.files[column] = [open(os.path.join(self.folder, column), "wb"), tuple(x.shape[1:]), x.dtype, 0]
        entry = self.files[column]
        entry[0].write(x.contiguous().numpy().tobytes())
        entry[3] += len(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return {c: torch.cat(xs) for c, xs in self.chunks.items()}
        import os
        import shutil

        import numpy as np

        out = {}
        for column, (file, shape, dtype, rows) in self.files.items():
            file.close()
            kind = torch.empty(0, dtype=dtype).numpy().dtype
            # copy-on-write mapping: writable as torch wants, never written, pages backed by the file
            mapped = np.memmap(os.path.join(self.folder, column), dtype=kind, mode="c", shape=(rows, *shape))
            out[column] = torch.from_numpy(mapped)
        shutil.rmtree(self.folder)  # unlinked: the mappings keep the data until they go
        return out


def cache_bytes(cfg: TrainConfig) -> int:
    """``cfg.cache_memory_share`` of this node's memory over the training workers on it: what one
    cache may hold in a worker's heap (called in a Ray Train worker)."""
    import os

    import ray.train

    local = ray.train.get_context().get_local_world_size()
    return int(cfg.cache_memory_share * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / max(1, local))


RECALIBRATION_BATCHES = 20
"""Batches whose BatchNorm statistics replace the running averages after each epoch."""


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, inputs, max_batches: int = RECALIBRATION_BATCHES,
                          forward: Callable | None = None) -> None:
    """Recompute the running statistics of the model's trainable BatchNorm layers as exact averages
    over ``inputs`` (an iterable of model inputs). The exponential averages lag behind weights that
    change every step; where features have a small spread (a randomly initialised frozen trunk) that
    lag alone ruins eval-mode outputs. ``forward(x)`` runs the model (default ``model(x)``)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and any(p.requires_grad for p in m.parameters())]
    if not layers:
        return
    was_training = {m: m.training for m in layers}
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    for i, x in enumerate(inputs):
        if i >= max_batches:
            break
        (forward or model)(x)
    for m in layers:
        m.momentum = momenta[m]
        m.train(was_training[m])
