"""What every Ray Train job shares: its config, worker setup, the learning-rate schedule,
checkpoint save/restore per epoch, resuming a rerun, fault injection for tests, and publishing the
final aver checkpoint.

Each job keeps its own ``train_loop_per_worker(config)``, which receives its config dataclass as
``config["cfg"]``; models stay free of Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from aver.console import VERBOSE_ENV, init_ray, verbose
from aver.faults import RetryPolicy
from aver.io.parts import join
from aver.models import autocast, save_checkpoint, skip_init
from aver.models.weights import ship
from aver.io.storage import absolute, exists, read_bytes, redact, url_to_fs, write_bytes_atomic

LR_SCHEDULES = ("constant", "cosine")
GRAD_COMMS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    output: str
    """Folder (local or fsspec URI) for Ray Train runs (checkpoints) and the final model."""
    name: str
    """Run name: checkpoints under OUTPUT/runs/NAME; its model OUTPUT/models/NAME.pt (a run of
    several variants publishes each under its variant's name)."""
    epochs: int = 5
    """Passes over the main training set."""
    batch_size: int = 32
    """Examples per step per worker."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 1e-4
    """Weight decay (AdamW)."""
    lr_schedule: str = field(default="constant", metadata={"choices": LR_SCHEDULES})
    """"constant", or "cosine": epoch e runs at lr * (1 + cos(pi * e / epochs)) / 2."""
    num_workers: int = 1
    """Data-parallel Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (leave some for Ray Data on small machines)."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    shuffle_buffer: int = 1024
    """Rows a streamed source holds for its local shuffle (at least 4 batches); the rows' blocks
    also come in a fresh random order every pass."""
    threads_per_worker: int = 0
    """Torch threads per worker; 0 = the CPUs of the worker's own machine over the training workers
    on it (Ray alone would give a 1-CPU worker one thread and leave the rest of the machine idle)."""
    log_every: int = 1
    """Print the metrics line every N epochs (and after the last)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train may make; each resumes from the last checkpoint."""
    cache_memory_share: float = 0.25
    """Share of a worker's memory (its node's, over the training workers on it) that one cached
    frozen-prefix or window source may hold in the worker's heap; a larger one is kept in a
    memory-mapped file on the node's local disk."""
    io_threads: int = 16
    """Image reads in flight per read task (an S3 GET waits 20-50 ms: one at a time, a GPU would wait)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How a read that fails transiently is retried before its image is dropped (and counted)."""
    grad_comm: str = field(default="auto", metadata={"choices": GRAD_COMMS})
    """How data-parallel workers exchange gradients: "bf16" (a DDP comm hook halves the all-reduce),
    "fp32" (as computed), "auto" (bf16 on GPUs, fp32 on CPUs)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for OUTPUT (e.g. an S3 endpoint)."""
    fail_at: tuple[int, int] | None = field(default=None, metadata={"cli": False})
    """Testing only: raise once at (epoch, step) on rank 0 to exercise recovery."""

    weight_fields: ClassVar[tuple[str, ...]] = ()
    """Fields naming pretrained weights (registry name or URI), shipped to the workers by :func:`begin`."""
    path_fields: ClassVar[tuple[str, ...]] = ("output",)
    """Fields naming data or outputs: a relative local path is made absolute (workers run in other folders)."""

    def default_variants(self) -> dict[str, Any]:
        """{default model name: variant} of what this run trains side by side on the same batches
        (both teachers, both VGGish dimensions, the fusion variants); most runs train one."""
        return {self.name: None}

    def named_variants(self) -> dict[str, Any]:
        """{published model name: variant}: a run of one variant publishes it as ``name``."""
        named = self.default_variants()
        return {self.name: next(iter(named.values()))} if len(named) == 1 else named

    def build_model(self, variant: Any = None, pretrained: bool = True) -> torch.nn.Module:
        """The network of one variant (``pretrained``: with the upstream weights the config names)."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        self.name = self.name or "+".join(self.default_variants())
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("epochs, batch_size and num_workers must be >= 1")
        if self.threads_per_worker < 0 or self.shuffle_buffer < 0 or self.log_every < 1:
            raise ValueError("threads_per_worker and shuffle_buffer must be >= 0, log_every >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.cpus_per_worker <= 0 or self.max_failures < 0:
            raise ValueError("lr > 0, weight_decay >= 0, cpus_per_worker > 0, max_failures >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.io_threads < 1 or not 0 < self.cache_memory_share <= 1:
            raise ValueError("io_threads must be >= 1 and cache_memory_share in (0, 1]")
        if isinstance(self.retry, dict):
            self.retry = RetryPolicy(**self.retry)
        if self.grad_comm not in GRAD_COMMS:
            raise ValueError(f"grad_comm must be one of {GRAD_COMMS}, got {self.grad_comm!r}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        if self.fail_at is not None:
            self.fail_at = tuple(self.fail_at)
        for name in self.path_fields:
            setattr(self, name, absolute(getattr(self, name)))

    @property
    def bf16_gradients(self) -> bool:
        """Whether DDP all-reduces gradients in bf16 (``grad_comm``)."""
        return self.grad_comm == "bf16" or (self.grad_comm == "auto" and self.use_gpu)

    def model_uri(self, name: str) -> str:
        return join(self.output, "models", f"{name}.pt")

    def metrics_uri(self, name: str) -> str:
        return join(self.output, "models", f"{name}.metrics.json")


class Variants(torch.nn.ModuleDict):
    """The models one run trains side by side on the same batches, as one module (one DDP wrapper,
    one optimizer). Their parameters are disjoint and the run minimises the sum of their losses:
    each parameter's gradient, and so its AdamW/Adam update, is its own model's alone, so each
    variant trains as it would in a run of its own, while the data is read and cached once.

    ``forward(inputs, **kwargs)`` takes ``{name: args}`` and returns ``{name: output}``.
    """

    def __init__(self, models: dict[str, torch.nn.Module]) -> None:
        super().__init__({str(i): m for i, m in enumerate(models.values())})  # names may hold dots
        self.names = list(models)

    def named(self) -> dict[str, torch.nn.Module]:
        return dict(zip(self.names, self.values()))

    def forward(self, inputs: dict[str, tuple], **kwargs) -> dict:
        return {name: m(*inputs[name], **kwargs) for name, m in self.named().items()}

    def same(self, *args) -> dict[str, tuple]:
        """The inputs of a forward that gives every variant the same arguments."""
        return dict.fromkeys(self.names, args)

    @property
    def first(self) -> torch.nn.Module:
        return self["0"]


def build_variants(cfg: TrainConfig, pretrained: bool = True, freeze: str | None = None) -> Variants:
    """Every variant of ``cfg``, each built from ``cfg.seed`` as a run of its own would build it.
    Variants trained on a frozen prefix share its cached outputs, so their prefixes must be equal
    (the same upstream weights, or the same seed)."""
    models = {}
    for name, variant in cfg.named_variants().items():
        torch.manual_seed(cfg.seed)
        models[name] = cfg.build_model(variant, pretrained=pretrained)
    model = Variants(models)
    if freeze and len(models) > 1:
        reference = model.first.prefix(freeze).state_dict()
        for name, m in model.named().items():
            mine = m.prefix(freeze).state_dict()
            if mine.keys() != reference.keys() or any(not torch.equal(mine[k], reference[k]) for k in mine):
                raise ValueError(f"{name}: variants trained in one run on a frozen {freeze} need the same "
                                 f"{freeze} weights; train them in runs of their own")
    return model


def prepare_worker(cfg: TrainConfig, *, freeze: str | None = None, unused: tuple[str, ...] = (),
                   optimizer: type = torch.optim.AdamW) -> tuple:
    """The common start of a train loop: seed and threads, the run's :class:`Variants` frozen up to
    ``freeze`` (``model.prefix``) and without gradients in the submodules named in ``unused`` (parts
    no loss of this run reaches: DDP would wait for their gradients forever), channels_last, wrapped
    by Ray Train, an optimizer over what trains, and the last checkpoint restored. Returns (model as
    wrapped, the Variants themselves, optimizer, first epoch, history, device)."""
    import ray.train.torch

    if not verbose():  # "Reporting training result ..." per report: its logger escapes Train's level filter
        import logging

        import ray.train.v2._internal.execution.context as train_context
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # this process runs on the worker's node: its CPUs, shared by the training workers placed there
    local = ray.train.get_context().get_local_world_size()
    torch.set_num_threads(cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // local))
    model = build_variants(cfg, freeze=freeze)
    for m in model.values():
        if freeze:
            m.prefix(freeze).requires_grad_(False)
        for name in unused:
            m.get_submodule(name).requires_grad_(False)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    compress_gradients(model, cfg)
    core = model.module if hasattr(model, "module") else model
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = restore(model, opt)
    return model, core, opt, start, history, ray.train.torch.get_device()


def compress_gradients(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """All-reduce a DDP model's gradients in bf16 when ``cfg.bf16_gradients`` (a DDP comm hook):
    half the bytes of every step's all-reduce (DenseNet201's gradients: ~73 MB in fp32); the
    optimizer still gets fp32 gradients, the bf16 sum cast back. A model that is not DDP (one
    worker) has nothing to send."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and cfg.bf16_gradients:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        model.register_comm_hook(None, bf16_compress_hook)


_epoch_started: dict[str, float] = {}
"""When this worker's current epoch began (for the epoch lines)."""


def epochs(cfg: TrainConfig, start: int, optimizer: torch.optim.Optimizer):
    """The epochs still to run, each with its learning rate set by ``lr_schedule``. The rate
    depends only on the epoch, so a resumed run continues the schedule where it stopped."""
    import math
    import time

    _epoch_started["t"] = time.monotonic()
    for epoch in range(start, cfg.epochs):
        lr = cfg.lr
        if cfg.lr_schedule == "cosine":
            lr *= (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2
        for group in optimizer.param_groups:
            group["lr"] = lr
        yield epoch


def is_finished(cfg: TrainConfig) -> bool:
    """True when the run's final models were published: a rerun must not retrain."""
    return all(exists(cfg.model_uri(name), cfg.storage_options) for name in cfg.named_variants())


def begin(cfg: TrainConfig, job: str) -> bool:
    """Whether ``job`` has work to do: False (and says so) when its final model exists; otherwise
    makes sure Ray is running (a local instance, or the cluster under ``ray job submit``)."""
    if is_finished(cfg):
        shown = ", ".join(redact(cfg.model_uri(name)) for name in cfg.named_variants())
        print(f"{job}: {shown} exist{'s' if len(cfg.named_variants()) == 1 else ''}; nothing to do", flush=True)
        return False
    for name in cfg.weight_fields:  # registry names resolved here, read by the workers from OUTPUT/weights
        if getattr(cfg, name):
            setattr(cfg, name, absolute(ship(getattr(cfg, name), join(cfg.output, "weights"),
                                             cfg.storage_options or None)))
    init_ray()
    return True


def ccc_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, predict: Callable,
              cfg: TrainConfig, epoch: int, total: int | None = None
              ) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """One epoch of 1 - CCC regression (Algorithm 2, fusion) of every variant:
    ``predict(batch) -> {name: (pred, target)}``, each step minimising the sum of their losses
    (``total``: the epoch's steps, when known, for the progress line). Returns ``{name: (mean loss,
    the epoch's predictions, its targets)}`` (on CPU)."""
    from aver.losses import ccc_loss

    progress = step_progress(cfg, epoch, total)
    model.train()
    losses: dict[str, list] = {}
    preds: dict[str, list] = {}
    targets: dict[str, list] = {}
    for step, batch in enumerate(batches):
        maybe_fail(cfg, epoch, step)
        with autocast(next(model.parameters()).device):
            out = predict(batch)
        loss_sum = 0.0
        for name, (pred, target) in out.items():
            pred, target = pred.float(), target.float()
            loss = ccc_loss(pred, target)
            loss_sum = loss_sum + loss
            losses.setdefault(name, []).append(loss.item())
            preds.setdefault(name, []).append(pred.detach().cpu())
            targets.setdefault(name, []).append(target.cpu())
        optimizer.zero_grad(set_to_none=True)
        loss_sum.backward()
        optimizer.step()
        progress.update()
    if not losses:
        raise RuntimeError("an epoch without a single batch: the shard is smaller than one batch")
    return {name: (sum(v) / len(v), torch.cat(preds[name]), torch.cat(targets[name])) for name, v in losses.items()}


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[int, list[dict]]:
    """Load the latest Ray Train checkpoint into ``model``/``optimizer``; (next epoch, history)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    target = model.module if hasattr(model, "module") else model
    target.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    history = json.loads(state["history"])
    print(f"resumed from the checkpoint of epoch {state['epoch']}", flush=True)
    return int(state["epoch"]) + 1, history


def report_epoch(epoch: int, metrics: dict[str, dict[str, float]], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None, history: list[dict], cfg: TrainConfig,
                 shared: dict[str, float] | None = None) -> list[dict]:
    """Report the epoch's metrics (``{variant name: {metric: value}}``, and ``shared`` ones such as
    the step count) with a checkpoint and the run's TensorBoard curves (both written by rank 0);
    returns the history, whose rows hold ``NAME/metric`` keys, the learning rate and the time.
    Rank 0 prints a line per variant (every ``cfg.log_every`` epochs and the last)."""
    import time

    import ray.train
    from ray.train import Checkpoint

    lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
    row = {"epoch": epoch, **{k: float(v) for k, v in (shared or {}).items()},
           **({"lr": float(lr)} if lr is not None else {}), "time": round(time.time(), 3),
           **{f"{name}/{k}": float(v) for name, m in metrics.items() for k, v in m.items()}}
    history = [*history, row]
    rank = ray.train.get_context().get_world_rank()
    if rank == 0 and ((epoch + 1) % cfg.log_every == 0 or epoch + 1 == cfg.epochs):
        took = time.monotonic() - _epoch_started.get("t", time.monotonic())
        for name, m in metrics.items():
            shown = " ".join(f"{k}={v:.4g}" for k, v in m.items())
            print(f"{name} epoch {epoch + 1}/{cfg.epochs}: {shown} ({took:.0f} s)", flush=True)
    _epoch_started["t"] = time.monotonic()
    if rank != 0:
        ray.train.report(row, checkpoint=None)
        return history
    write_bytes_atomic(events_uri(cfg), tensorboard_events(history), cfg.storage_options)
    target = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory() as d:
        torch.save({"epoch": epoch, "model": target.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "history": json.dumps(history)}, os.path.join(d, "state.pt"))
        ray.train.report(row, checkpoint=Checkpoint.from_directory(d))
    return history


EVENTS_FILE = "events.out.tfevents.aver"
"""The run's TensorBoard event file, in OUTPUT/runs/NAME beside its checkpoints."""


def events_uri(cfg: TrainConfig) -> str:
    return join(cfg.output, "runs", cfg.name, EVENTS_FILE)


def tensorboard_events(history: list[dict]) -> bytes:
    """A TensorBoard event file of every epoch of ``history``: each metric (``NAME/metric`` tags,
    one chart per variant and metric), the learning rate and the step count, at step = epoch.
    Rewritten whole from the history at every epoch, so a run resumed from a checkpoint (whose
    history ends at that epoch) continues the same curves with no epoch twice or missing, and the
    same rows give the same bytes (each event's time is its row's): TensorBoard, which reads a
    file on from where it stopped, sees only the new epochs appended."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.record_writer import masked_crc32c

    def record(event: Event) -> bytes:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))

    start = history[0].get("time", 0.0) if history else 0.0
    out = [record(Event(wall_time=start, file_version="brain.Event:2"))]
    for row in history:
        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in row.items() if k not in ("epoch", "time")]
        out.append(record(Event(wall_time=row.get("time", start), step=int(row["epoch"]),
                                summary=Summary(value=values))))
    return b"".join(out)


def step_progress(cfg: TrainConfig, epoch: int, total: int | None):
    """An epoch's steps as they go (a :class:`~aver.console.Progress`): a line every 30 s from rank 0
    (workers write to a log, never a terminal), steps done out of ``total`` when known, the rate and
    the time left; no final line (the epoch's metrics line follows)."""
    import math

    import ray.train

    from aver.console import Progress

    rank0 = ray.train.get_context().get_world_rank() == 0
    return Progress(f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}", total or None, unit="steps",
                    every_s=30.0 if rank0 else math.inf)


def variant_history(history: list[dict], name: str) -> list[dict]:
    """One variant's rows of a run's history, its keys without the ``NAME/`` prefix."""
    return [{k.split("/", 1)[1] if "/" in k else k: v for k, v in row.items()
             if "/" not in k or k.startswith(name + "/")} for row in history]


def require_batches(n_examples: int, cfg: TrainConfig, what: str) -> None:
    """Refuse to start a run that could not take a single step (CCC losses drop the last partial
    batch): a run that reports metrics of zero steps would look like a perfect one."""
    needed = cfg.batch_size * cfg.num_workers
    if n_examples < needed:
        raise ValueError(f"{n_examples} {what} cannot fill one batch of {cfg.batch_size} on each of "
                         f"{cfg.num_workers} workers: lower --batch-size or give more data")


def maybe_fail(cfg: TrainConfig, epoch: int, step: int) -> None:
    """Raise once at ``fail_at`` on rank 0 (a marker in the run folder makes it once only)."""
    import ray.train

    if not cfg.fail_at or (epoch, step) != tuple(cfg.fail_at) or ray.train.get_context().get_world_rank() != 0:
        return
    marker = join(cfg.output, "runs", cfg.name, "injected_failure")
    if exists(marker, cfg.storage_options):
        return
    write_bytes_atomic(marker, b"1", cfg.storage_options)
    raise RuntimeError(f"injected failure at epoch {epoch}, step {step}")


def _storage(cfg: TrainConfig) -> tuple[str, Any]:
    if "://" not in cfg.output:
        return os.path.abspath(join(cfg.output, "runs")), None
    import pyarrow.fs

    fs, path = url_to_fs(cfg.output, cfg.storage_options)
    return join(path, "runs"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _quiet_train() -> dict:
    """RunConfig options that keep Ray Train's own INFO lines (checkpoint created, worker group
    started, ...) out of the terminal unless verbose: they stay in the session's log files. With
    Train's print patch off, a worker's print is one plain line (with it, each came twice)."""
    import ray.train

    if verbose():
        return {"worker_runtime_env": {"env_vars": {VERBOSE_ENV: "1"}}}
    return {"logging_config": ray.train.LoggingConfig(log_level="WARNING"),
            "worker_runtime_env": {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}}


def fit(train_loop: Callable[[dict], None], cfg: TrainConfig, datasets: dict, job: str,
        loop_config: dict | None = None) -> dict[str, list[dict]]:
    """Run ``train_loop`` under a TorchTrainer (resuming a previous run of the same name; its config
    ``{"cfg": cfg, **loop_config}``), then publish each variant of the last checkpoint as an aver
    checkpoint with its metric history; says what it starts and, at the end, what it did and where
    the models and the logs are. Returns ``{model name: history}``."""
    import time

    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aver.console import duration, logs_dir

    started = time.monotonic()
    names = list(cfg.named_variants())
    what = cfg.name if names == [cfg.name] else f"{' and '.join(names)} side by side"
    print(f"{job}: training {what} for {cfg.epochs} epochs on {cfg.num_workers} worker"
          f"{'s' if cfg.num_workers > 1 else ''} ({'GPU' if cfg.use_gpu else 'CPU'})", flush=True)
    storage_path, storage_fs = _storage(cfg)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, **(loop_config or {})},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), **_quiet_train()),
        datasets=datasets,
        # One worker reads its datasets whole: no split, so no split-coordinator actor (a process
        # and a Ray Data execution of its own) per dataset.
        dataset_config=DataConfig(datasets_to_split="all" if cfg.num_workers > 1 else []),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    with skip_init():
        model = build_variants(cfg, pretrained=False)
    model.load_state_dict(state["model"])
    history = json.loads(state["history"])
    histories = {}
    for name, variant in model.named().items():
        histories[name] = mine = variant_history(history, name)
        write_bytes_atomic(cfg.metrics_uri(name), json.dumps(mine, indent=1).encode(), cfg.storage_options)
        save_checkpoint(variant.eval(), cfg.model_uri(name), meta={"history": json.dumps(mine), "name": name},
                        storage_options=cfg.storage_options)  # published last: its presence means finished
    took, logs = duration(time.monotonic() - started), logs_dir()
    for i, (name, mine) in enumerate(histories.items(), start=1):
        last = " ".join(f"{k}={v:.4g}" for k, v in mine[-1].items() if k not in ("epoch", "steps", "lr", "time"))
        print(f"{job}: {name} done in {took}: last epoch {last}; model {redact(cfg.model_uri(name))}"
              f"{'; logs ' + logs if logs and i == len(histories) else ''}", flush=True)
    return histories


def load_history(cfg: TrainConfig, name: str | None = None) -> list[dict]:
    """A published model's metric history (``name``: the run's model when it trains one)."""
    return json.loads(read_bytes(cfg.metrics_uri(name or cfg.name), cfg.storage_options))
