"""Units of work shared by the batch jobs: stable image chunks, what is left to do, and running
units through a pool of Ray Data actors (one unit per call, outputs written by the actor)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from aver.outputs import completed_units, join


@dataclass(kw_only=True)
class ActorPoolConfig:
    """The actor pool of a Ray Data job (extract_faces, distill, score_videos) and its storage."""

    actors: int = 0
    """Actors; 0 picks one per GPU share, or CPUs - 1 (at least 1) without GPUs."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (decoding runs inside it, in a prefetch thread)."""
    gpus_per_actor: float = 0.0
    """GPU share per actor (e.g. 0.25 puts four actors on one GPU); 0 runs on CPU. On CUDA the
    models run in bf16 autocast, channels_last."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for inputs, models and output (e.g. an S3 endpoint, credentials)."""

    def __post_init__(self) -> None:
        if self.actors < 0 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("actors >= 0, cpus_per_actor > 0, gpus_per_actor >= 0")


def stable_chunks(ids: list[str], per_unit: int, prefix: str = "images") -> list[tuple[str, slice]]:
    """Chunks of ``per_unit`` consecutive ids, each named so the name is stable for the same input."""
    chunks = []
    for start in range(0, len(ids), per_unit):
        part = slice(start, start + per_unit)
        digest = hashlib.sha1("\n".join(ids[part]).encode()).hexdigest()[:12]
        chunks.append((f"{prefix}-{start // per_unit:06d}-{digest}", part))
    return chunks


def pending(units: list[dict], output: str, storage_options: dict | None = None) -> list[dict]:
    """The units whose status part is not yet in ``output/status/``."""
    done = completed_units(join(output, "status"), storage_options)
    return [u for u in units if u["unit_id"] not in done]


def actor_count(actors: int, cpus_per_actor: float, gpus_per_actor: float, n_units: int) -> int:
    """Actors to start: as asked, else one per GPU share, else CPUs - 1; never more than units."""
    import ray

    if actors:
        return max(1, min(actors, n_units))
    res = ray.cluster_resources()
    if gpus_per_actor > 0 and res.get("GPU", 0) > 0:
        n = int(res["GPU"] / gpus_per_actor)
    else:
        n = int(res.get("CPU", 1) / cpus_per_actor) - 1  # leave room for Ray Data's own tasks
    return max(1, min(n, n_units))


def actor_threads(cpus_per_actor: float) -> None:
    """Torch threads for an actor: its CPU reservation, rounded (Ray sets OMP_NUM_THREADS=1 for
    fractional or 1-CPU actors; an actor holding 2 CPUs should use both)."""
    import torch

    torch.set_num_threads(max(1, int(round(cpus_per_actor))))


def actor_device(gpus_per_actor: float, who: str):
    """The torch device of an actor that asked Ray for ``gpus_per_actor``: CUDA when it works, else
    the CPU, said in the log (a node may declare a GPU resource that CUDA cannot reach)."""
    import ray
    import torch

    if gpus_per_actor <= 0:
        return torch.device("cpu")
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if torch.cuda.is_available():
        print(f"{who}: on CUDA (Ray GPU ids {ids})", flush=True)
        return torch.device("cuda")
    print(f"{who}: Ray GPU ids {ids} but CUDA is not available: falling back to CPU", flush=True)
    return torch.device("cpu")


def map_units(units: list[dict], actor_cls: type, cfg: ActorPoolConfig) -> Iterator:
    """Stream ``units`` through ``actor_cls(cfg)`` actors, as many as ``cfg`` asks; yields the
    actors' result batches (pandas). Starts a local Ray if none is running (under ``ray job
    submit`` this connects to the cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    remote_args = {"num_cpus": cfg.cpus_per_actor}
    if cfg.gpus_per_actor > 0:
        remote_args["num_gpus"] = cfg.gpus_per_actor
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(actor_cls, fn_constructor_kwargs={"cfg": cfg}, batch_size=1,
                        concurrency=actor_count(cfg.actors, cfg.cpus_per_actor, cfg.gpus_per_actor, len(units)),
                        **remote_args)
    yield from ds.iter_batches(batch_size=None, batch_format="pandas")
