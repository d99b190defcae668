"""Where a batch job runs: joining the Ray cluster (and refusing node-local paths on several
nodes), and what each worker process sets up before it runs a stage."""

from __future__ import annotations

import logging
import os
import sys

from aver.console import init_ray
from aver.io.storage import is_local, redact, register_secrets
from aver.io.streaming import actor_device

log = logging.getLogger("aver")


def actor_setup(cfg, who: str):
    """What every job actor does first: learn the secrets to redact (a config unpickled in the
    actor has not run ``__post_init__``), size torch's threads, pick its device."""
    register_secrets(cfg.storage_options)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    import torch

    # Threads = the CPU reservation, rounded: Ray sets OMP_NUM_THREADS=1 for fractional or 1-CPU
    # actors, and an actor holding 2 CPUs should use both.
    torch.set_num_threads(max(1, int(round(cfg.cpus_per_actor))))
    return actor_device(cfg.gpus_per_actor, who)


def keep_task_workers() -> None:
    """Before ``ray.init()`` starts a local Ray: let it keep more idle worker processes than its
    default (its CPU count, model actors included). On a few-CPU machine that default kills a load
    or write task's worker as soon as it idles a second, and the next task pays a new process and
    its imports (torch, PyAV: seconds of CPU taken from the models). No effect on a running cluster."""
    os.environ.setdefault("RAY_num_workers_soft_limit", str(max(4, 2 * (os.cpu_count() or 1))))


def connect(cfg) -> None:
    """Join the Ray cluster (``ray.init()``: under ``ray job submit`` the job's cluster, else a new
    local one; a job calls it once it has planned work, so a rerun with nothing to do starts no Ray)
    and refuse node-local paths on a multi-node cluster: each node would read its own
    disk and write outputs there, where no rerun finds them. ``--shared-fs`` says the paths are
    mounted everywhere."""
    import ray

    if not ray.is_initialized():
        keep_task_workers()
        init_ray()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes < 2 or cfg.shared_fs:
        return
    local = [(name, uri) for name, uri in cfg.storage_uris() if uri and is_local(str(uri).rsplit("::", 1)[-1])]
    if local:
        named = ", ".join(f"--{name.replace('_', '-')} {redact(str(uri))}" for name, uri in local)
        raise ValueError(f"{named}: local path{'s' if len(local) > 1 else ''} on a Ray cluster of {nodes} nodes; "
                         "tasks and actors run on any node, and each would see its own disk (outputs scattered, "
                         "reruns blind to them). Use a store every node reaches (s3://, gs://, ...), or pass "
                         "--shared-fs if these paths are on a filesystem every node mounts.")
