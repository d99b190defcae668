"""Batches for the train loops: a worker's dataset shard turned into model inputs (optionally
through a frozen, cached prefix), and BatchNorm recalibration."""

from __future__ import annotations

from typing import Callable

import torch

from aver.data.prefix_store import PrefixStore, prefix_store_folder
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
    ``encode``: streamed afresh every epoch, or, with ``cache=True`` (``encode`` runs a frozen
    prefix), encoded once, kept in memory as float16 and reshuffled every epoch. The cache is what
    makes a frozen-trunk recipe cheap: the prefix is most of the compute and its output never changes.
    With a ``store`` the encoded images are also read from / added to a :class:`PrefixStore`."""

    def __init__(self, shard, image_columns: tuple[str, ...], encode: Callable, batch_size: int, *,
                 cache: bool, seed: int, drop_last: bool = False, store: PrefixStore | None = None) -> None:
        self.shard, self.columns, self.encode, self.bs = shard, image_columns, encode, batch_size
        self.seed, self.cached, self.drop_last, self.store = seed, None, drop_last, store
        if cache:
            self.cached = self._encode_all()
            if store is not None:
                store.save()

    @torch.no_grad()
    def _encode_all(self) -> dict:
        import numpy as np

        parts: dict[str, list] = {}
        for b in self.shard.iter_batches(batch_size=64, batch_format="numpy"):
            for k, v in b.items():
                if k in self.columns:
                    v = self.store.encode(v, self.encode) if self.store else self.encode(v).half().cpu()
                parts.setdefault(k, []).append(v)
        if not parts:
            raise RuntimeError("this worker's dataset shard is empty")
        return {k: torch.cat(v) if k in self.columns else np.concatenate(v) for k, v in parts.items()}

    def epoch(self, epoch: int):
        """One pass, shuffled (by epoch, reproducibly, when cached)."""
        if self.cached is None:
            for b in self.shard.iter_batches(batch_size=self.bs, batch_format="numpy", drop_last=self.drop_last,
                                             local_shuffle_buffer_size=4 * self.bs):
                yield {k: self.encode(v) if k in self.columns else v for k, v in b.items()}
            return
        n = len(next(iter(self.cached.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        end = len(order) - len(order) % self.bs if self.drop_last else len(order)
        for s in range(0, end, self.bs):
            idx = order[s:s + self.bs]
            yield {k: v[idx].float() if k in self.columns else v[idx.numpy()] for k, v in self.cached.items()}

    def cycle(self, epoch: int):
        """Endless batches (a secondary source beside the epoch's main one)."""
        round_ = 0
        while True:
            yielded = False
            for b in self.epoch(epoch * 1000 + round_):
                yielded = True
                yield b
            if not yielded:
                return
            round_ += 1


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, inputs, max_batches: int = 20,
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
