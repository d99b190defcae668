"""Command-line flags the jobs share: every training job's (:class:`aver.training.TrainConfig`) and
every actor-pool job's (:class:`aver.units.ActorPoolConfig`)."""

from __future__ import annotations

import argparse
import json


def add_train_args(p: argparse.ArgumentParser, *, name: str, epochs: int, batch_size: int, lr: float) -> None:
    g = p.add_argument_group("training (Ray Train)")
    g.add_argument("--output", required=True, help="folder (local or fsspec URI) for runs/ checkpoints and models/")
    g.add_argument("--name", default=name, help=f"run name; model at OUTPUT/models/NAME.pt (default {name})")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step per worker (default {batch_size})")
    g.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant, or cosine decay over the epochs (default constant)")
    g.add_argument("--num-workers", type=int, default=1, help="data-parallel workers (default 1)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    g.add_argument("--threads-per-worker", type=int, default=0,
                   help="torch threads per worker (default 0: the machine's CPUs over the workers)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--max-failures", type=int, default=2, help="restarts from the last checkpoint (default 2)")
    g.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    g.add_argument("--fail-at", type=int, nargs=2, default=None, metavar=("EPOCH", "STEP"),
                   help=argparse.SUPPRESS)  # tests: inject one worker failure


def train_kwargs(a: argparse.Namespace) -> dict:
    return {"output": a.output, "name": a.name, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
            "weight_decay": a.weight_decay, "lr_schedule": a.lr_schedule, "num_workers": a.num_workers, "use_gpu": a.use_gpu,
            "cpus_per_worker": a.cpus_per_worker, "threads_per_worker": a.threads_per_worker, "seed": a.seed,
            "max_failures": a.max_failures,
            "storage_options": a.storage_options, "fail_at": tuple(a.fail_at) if a.fail_at else None}


def add_actor_args(p: argparse.ArgumentParser, *, what: str) -> None:
    g = p.add_argument_group("actor pool (Ray Data)")
    g.add_argument("--actors", type=int, default=0, help=f"{what} actors (default 0: one per GPU share, or CPUs-1)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    g.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPU share per actor, e.g. 0.25 puts four on a GPU (default 0: CPU)")
    g.add_argument("--storage-options", type=json.loads, default={},
                   help="fsspec options as JSON, e.g. '{\"anon\": false}' (under ray job submit, prefer "
                        "credentials from the environment: the job API records the command line)")
    g.add_argument("--io-retries", type=int, default=4,
                   help="tries per input and per output write on transient storage faults (default 4)")
    g.add_argument("--retry-backoff-s", type=float, default=1.0,
                   help="delay before the second try, doubling each try (default 1)")


def actor_kwargs(a: argparse.Namespace) -> dict:
    from aver.faults import RetryPolicy

    return {"actors": a.actors, "cpus_per_actor": a.cpus_per_actor, "gpus_per_actor": a.gpus_per_actor,
            "storage_options": a.storage_options,
            "retry": RetryPolicy(attempts=a.io_retries, backoff_s=a.retry_backoff_s)}
