"""The face networks' training (Algorithm 1, §3.1.2): one loop for the teacher and the student.

Every step draws an AffectNet batch and an FEC triplet batch and runs them through the network in
one forward pass: L = L_FEC + alpha * L_AffectNet. With distillation targets (the student), the
80-d head also learns RKD against the teachers' targets on every crop that has one, and an
unlabeled batch joins each step, contributing RKD only. Several teachers (``--d-face 128 256``)
train side by side on the same batches and the same cached trunk outputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from aver.data.faces import DroppedImages, Reading, affectnet_dataset, fec_dataset, unlabeled_dataset
from aver.io.streaming import trim_heap
from aver.losses import FaceLossConfig, fec_triplet_loss, rkd_loss
from aver.models import Student, Teacher, TeacherConfig, autocast, to_device
from aver.train.batches import (RECALIBRATION_BATCHES, ShardBatches, cache_bytes, input_encoder,
                                recalibrate_batchnorm)
from aver.train.harness import (TrainConfig, begin, epochs, fit, maybe_fail, prepare_worker, report_epoch,
                                step_progress)


@dataclass
class FaceTrainConfig(TrainConfig):
    """What the teacher and the student train on (Algorithm 1): AffectNet and FEC, and the loss weights."""

    path_fields = ("output", "affectnet", "fec", "affectnet_images", "fec_images")

    affectnet: str = ""
    """AffectNet training.csv (local or fsspec URI): the release's
    Manually_Annotated_file_lists/training.csv, or a training.csv beside Manually_Annotated_Images/."""
    fec: str = ""
    """Google FEC faceexp-comparison-data-train-public.csv, its images fetched by fetch_fec into
    images/ beside it."""
    affectnet_images: str | None = None
    """AffectNet's Manually_Annotated_Images/ (default: that folder beside the CSV, else beside the
    CSV's folder, as the release lays them out)."""
    fec_images: str | None = None
    """Fetched FEC images (default: images/ beside the CSV, where fetch_fec puts them)."""
    loss: FaceLossConfig = field(default_factory=FaceLossConfig)
    """Margins, alpha and the RKD weights (RKD: the student only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.affectnet or not self.fec:
            raise ValueError("training on faces needs both --affectnet and --fec")
        if isinstance(self.loss, dict):
            self.loss = FaceLossConfig(**self.loss)

    @property
    def targets_uri(self) -> str | None:
        """distill output whose targets the 80-d head learns (RKD); None: no distillation."""
        return None

    @property
    def unlabeled_uri(self) -> str | None:
        """Unlabeled images that join every step (RKD only); None: none."""
        return None


@dataclass
class TeacherTrainConfig(FaceTrainConfig):
    name: str = ""
    """Run name: checkpoints under OUTPUT/runs/NAME (default teacherD, or teacherD1+teacherD2 for
    several --d-face); one teacher is published as OUTPUT/models/NAME.pt, several as teacherD.pt each."""
    d_face: tuple[int, ...] = (TeacherConfig.d_face,)
    """Face embedding widths: one teacher per width, trained side by side on the same batches (the
    paper's two: 128 256)."""
    facenet: str | None = None
    """facenet-pytorch VGGFace2 weights for the trunk (registry name or URI); None = random init."""
    freeze: str | None = field(default=None, metadata={"choices": Teacher.stages})
    """"trunk": train only the layers after the trunk, whose outputs are computed once and cached
    (fast recipe; the trunk keeps its weights and BN statistics). None trains everything."""

    weight_fields = ("facenet",)

    def __post_init__(self) -> None:
        self.d_face = (self.d_face,) if isinstance(self.d_face, int) else tuple(self.d_face)
        if not self.d_face or any(d < 1 for d in self.d_face) or len(set(self.d_face)) < len(self.d_face):
            raise ValueError(f"d_face must be distinct positive widths, got {self.d_face}")
        super().__post_init__()
        if self.freeze is not None and self.freeze not in Teacher.stages:
            raise ValueError(f"freeze must be None or one of {Teacher.stages}, got {self.freeze!r}")

    def default_variants(self) -> dict[str, int]:
        return {f"teacher{d}": d for d in self.d_face}

    def build_model(self, variant: int | None = None, pretrained: bool = True) -> Teacher:
        d_face = variant or self.d_face[0]
        if pretrained and self.facenet:
            return Teacher.from_facenet(self.facenet, storage_options=self.storage_options or None, d_face=d_face)
        return Teacher(TeacherConfig(d_face=d_face))


@dataclass
class StudentTrainConfig(FaceTrainConfig):
    name: str = "student"
    """Run name: checkpoints under OUTPUT/runs/NAME, final model OUTPUT/models/NAME.pt."""
    batch_size: int = 16
    """Examples per step per worker (each step also takes as many FEC triplets)."""
    targets: str | None = None
    """distill.py output folder (targets/ with crop_id, target[80]); None trains without distillation."""
    unlabeled: str | None = None
    """Unlabeled face crops (the PowderFaces role), distilled with the same teachers: extract_faces'
    output (faces parts, read packed, targets joined part by part), or a folder, glob or manifest
    of images."""
    imagenet: str | None = None
    """torchvision DenseNet201 ImageNet weights (registry name or URI); None = random init."""
    freeze: str | None = field(default=None, metadata={"choices": Student.stages})
    """Backbone stage up to which the student stays frozen (e.g. "transition3": train denseblock4,
    norm5 and the heads); its outputs are computed once and cached. None trains everything."""

    weight_fields = ("imagenet",)
    path_fields = FaceTrainConfig.path_fields + ("targets", "unlabeled")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze is not None and self.freeze not in Student.stages:
            raise ValueError(f"freeze must be None or one of {Student.stages}, got {self.freeze!r}")
        if self.unlabeled and not self.targets:
            raise ValueError("unlabeled images only contribute through distillation: give --targets too")

    @property
    def targets_uri(self) -> str | None:
        return self.targets

    @property
    def unlabeled_uri(self) -> str | None:
        return self.unlabeled

    def build_model(self, variant: None = None, pretrained: bool = True) -> Student:
        if pretrained and self.imagenet:
            return Student.from_imagenet(self.imagenet, storage_options=self.storage_options or None)
        return Student()


def _triplet_correct(e_i: torch.Tensor, e_j: torch.Tensor, e_k: torch.Tensor) -> torch.Tensor:
    d = lambda a, b: (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1)  # noqa: E731
    return ((d(e_i, e_j) < d(e_i, e_k)) & (d(e_i, e_j) < d(e_j, e_k))).float().mean()


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg: FaceTrainConfig = config["cfg"]
    freeze = cfg.freeze
    distill = cfg.targets_uri is not None
    # a student without targets never trains its distillation head
    unused = ("distill_head",) if isinstance(cfg, StudentTrainConfig) and not distill else ()
    model, core, optimizer, start, history, device = prepare_worker(cfg, freeze=freeze, unused=unused)
    loss_cfg = cfg.loss
    # the variants' frozen prefixes are equal (build_variants): one cache serves them all
    encode, store = input_encoder(cfg, core.first, freeze, type(core.first).preprocess, device)
    budget = cache_bytes(cfg)

    def source(name: str, columns: tuple[str, ...], seed: int) -> ShardBatches:
        return ShardBatches(ray.train.get_dataset_shard(name), columns, encode, cfg.batch_size, cache=bool(freeze),
                            seed=seed, store=store, shuffle_buffer=cfg.shuffle_buffer, cache_bytes=budget)

    def frozen_eval() -> None:
        if freeze:
            for m in core.values():
                m.prefix(freeze).eval()

    # An epoch is a pass over AffectNet; FEC and the unlabeled crops are streams that go on from
    # where the last epoch (or the run that was resumed) left them: one batch of each per step.
    affectnet = source("affectnet", ("image",), cfg.seed)
    trained = sum(int(h.get("steps", 0)) for h in history)
    fec_iter = source("fec", ("i", "j", "k"), cfg.seed + 1).stream(trained)
    unl_iter = source("unlabeled", ("image",), cfg.seed + 2).stream(trained) if cfg.unlabeled_uri else None
    datasets = ("affectnet", "fec", "unlabeled") if unl_iter is not None else ("affectnet", "fec")
    keys = ("loss", "loss_rkd") if distill else ("loss",)
    keys += ("loss_fec", "loss_affectnet", "accuracy", "triplet_accuracy")
    for epoch in epochs(cfg, start, optimizer):
        model.train()
        frozen_eval()
        totals = {name: dict.fromkeys(keys, 0.0) for name in core.names}
        steps = 0
        recent = deque(maxlen=RECALIBRATION_BATCHES)  # the epoch's last inputs, for the BN statistics
        progress = step_progress(cfg, epoch, affectnet.steps)
        for step, batch in enumerate(affectnet.epoch(epoch)):
            maybe_fail(cfg, epoch, step)
            recent.append(batch["image"])
            trip = next(fec_iter)
            parts = [batch["image"], trip["i"], trip["j"], trip["k"]]
            if unl_iter is not None:
                unl = next(unl_iter)
                parts.append(unl["image"])
            with autocast(device):  # one forward pass over every batch: DDP syncs BN buffers on each
                outs = model(core.same(to_device(torch.cat(parts), device)), after=freeze)
            na, n = len(batch["image"]), len(trip["i"])
            labels = torch.as_tensor(batch["label"]).long().to(device)
            margins = loss_cfg.margins(torch.as_tensor(trip["type"]).to(device))
            if distill:  # the targets came joined to the rows, in the order of the forward's images
                joined = [batch, *({"target": trip[f"target_{x}"], "has_target": trip[f"has_target_{x}"]}
                                   for x in "ijk")] + ([unl] if unl_iter is not None else [])
                target = torch.cat([torch.as_tensor(np.asarray(b["target"], np.float32)) for b in joined])
                mask = torch.cat([torch.as_tensor(np.asarray(b["has_target"], bool)) for b in joined])
            loss = 0.0
            for name, out in outs.items():  # the sum of the variants' losses: each trains as if alone
                out = type(out)(*(o.float() for o in out))
                logits = out.affectnet[:na]
                loss_aff = F.cross_entropy(logits, labels)
                e_i, e_j, e_k = out.fec[na:na + n], out.fec[na + n:na + 2 * n], out.fec[na + 2 * n:na + 3 * n]
                loss_fec = fec_triplet_loss(e_i, e_j, e_k, margins)
                mine = loss_fec + loss_cfg.affectnet_weight * loss_aff
                t = totals[name]
                if distill:
                    # fewer than 3 crops with a target: a zero that still reaches the head, whose
                    # gradient every DDP rank waits for
                    loss_rkd = 0.0 * out.distill.sum()
                    if int(mask.sum()) >= 3:
                        loss_rkd = rkd_loss(out.distill[mask.to(device)], target[mask].to(device),
                                            distance_weight=loss_cfg.rkd_distance_weight,
                                            angle_weight=loss_cfg.rkd_angle_weight)
                    mine = mine + loss_rkd
                    t["loss_rkd"] += loss_rkd.item()
                loss = loss + mine
                t["loss"] += mine.item()
                t["loss_fec"] += loss_fec.item()
                t["loss_affectnet"] += loss_aff.item()
                t["accuracy"] += (logits.argmax(1) == labels).float().mean().item()
                t["triplet_accuracy"] += _triplet_correct(e_i.detach(), e_j.detach(), e_k.detach()).item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            progress.update()
        core.eval()
        for m in core.values():
            recalibrate_batchnorm(m, (x.to(device) for x in recent), forward=lambda x, m=m: m(x, after=freeze))
        recent.clear()
        trim_heap()
        metrics = {name: {k: v / max(steps, 1) for k, v in t.items()} for name, t in totals.items()}
        history = report_epoch(epoch, metrics, model, optimizer, history, cfg,
                               shared={"steps": steps, **dropped_images(config.get("dropped"), datasets)})


def dropped_images(counter, sources: tuple[str, ...]) -> dict[str, int]:
    """``dropped_SOURCE``: the images of each source that could not be read so far in this run
    (they are left out of its batches), from the run's :class:`~aver.data.faces.DroppedImages`."""
    import ray

    counts = ray.get(counter.counts.remote()) if counter is not None else {}
    return {f"dropped_{s}": counts.get(s, 0) for s in sources}


def run(cfg: FaceTrainConfig) -> dict[str, list[dict]] | None:
    """Train (or resume) the teachers or a student; returns ``{model name: metric history}``, None
    when already finished."""
    job = "train_student" if isinstance(cfg, StudentTrainConfig) else "train_teacher"
    if not begin(cfg, job):
        return None
    import ray

    targets = cfg.targets_uri
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node, which the job lives and dies with (a worker node may be lost mid-run)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    dropped = ray.remote(DroppedImages).options(num_cpus=0, scheduling_strategy=here).remote()
    reading = Reading(storage_options=cfg.storage_options or None, io_threads=cfg.io_threads, retry=cfg.retry,
                      dropped=dropped)
    affectnet, _ = affectnet_dataset(cfg.affectnet, cfg.affectnet_images, reading=reading, shuffled=True,
                                     targets=targets)
    fec, _ = fec_dataset(cfg.fec, cfg.fec_images, reading=reading, shuffled=True, targets=targets)
    affectnet = affectnet.drop_columns(["crop_id"])  # ids only named the rows whose targets were joined
    fec = fec.drop_columns(["i_id", "j_id", "k_id"])
    datasets = {"affectnet": affectnet, "fec": fec}
    if isinstance(cfg, StudentTrainConfig):
        print(f"{job}: distillation {'on' if cfg.targets else 'off'}", flush=True)
    if cfg.unlabeled_uri:
        unlabeled = unlabeled_dataset(cfg.unlabeled_uri, reading=reading, shuffled=True, targets=targets)
        datasets["unlabeled"] = unlabeled.drop_columns(["crop_id"])
    return fit(train_loop_per_worker, cfg, datasets, job, {"dropped": dropped})
