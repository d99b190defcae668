"""train_student: the distilled DenseNet201 student (paper §3.1.2): RKD between its 80-d head and
the teachers' targets, plus the FEC triplet and alpha * AffectNet losses of Algorithm 1; unlabeled
batches contribute RKD only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aver.face_data import FaceTrainConfig, labelled_face_data, to_student_input, unlabeled_dataset
from aver.losses import FaceLossConfig, fec_triplet_loss, rkd_loss
from aver.models.student import Student
from aver.training import (ShardBatches, autocast, begin, epochs, fit, input_encoder, maybe_fail, prepare_worker,
                           recalibrate_batchnorm, report_epoch, to_device)


@dataclass
class StudentTrainConfig(FaceTrainConfig):
    targets: str | None = None
    """distill.py output folder (targets/ with crop_id, target[80]); None trains without distillation."""
    unlabeled: str | None = None
    """Unlabeled face images (the PowderFaces role), distilled with the same teachers."""
    imagenet: str | None = None
    """torchvision DenseNet201 ImageNet weights (registry name or URI); None = random init."""
    freeze: str | None = None
    """Backbone stage up to which the student stays frozen (e.g. "transition3": train denseblock4,
    norm5 and the heads); its outputs are computed once and cached. None trains everything."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze is not None and self.freeze not in Student.stages:
            raise ValueError(f"freeze must be None or one of {Student.stages}, got {self.freeze!r}")
        if self.unlabeled and not self.targets:
            raise ValueError("unlabeled images only contribute through distillation: give --targets too")


def build_student(config: dict) -> torch.nn.Module:
    if config.get("imagenet"):
        return Student.from_imagenet(config["imagenet"], storage_options=config.get("storage_options") or None)
    return Student()


class TargetTable:
    """The distillation targets, looked up by crop id on each worker."""

    def __init__(self, uri: str | None, storage_options: dict | None) -> None:
        self.index: dict[str, int] = {}
        self.matrix = np.zeros((0, 80), np.float32)
        if uri:
            from aver.outputs import join, read_folder

            table = read_folder(join(uri, "targets"), storage_options)
            self.index = {c: i for i, c in enumerate(table["crop_id"].to_pylist())}
            self.matrix = np.asarray(table["target"].to_pylist(), np.float32).reshape(-1, 80)

    def lookup(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets [N,80], mask [N]) for ``ids``; crops without a target are masked out."""
        rows = [self.index.get(str(i), -1) for i in ids]
        mask = torch.tensor([r >= 0 for r in rows])
        out = torch.zeros(len(rows), 80)
        if mask.any():
            out[mask] = torch.from_numpy(self.matrix[[r for r in rows if r >= 0]])
        return out, mask


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    freeze = config["freeze"]
    model, core, optimizer, start, history, device = prepare_worker(build_student, config, freeze=freeze)
    loss_cfg = FaceLossConfig(**config["loss"])
    targets = TargetTable(config.get("targets"), config.get("storage_options") or None)
    distill = bool(config.get("targets"))
    bs = config["batch_size"]
    encode, store = input_encoder(config, core, freeze, to_student_input, device)

    def source(name: str, columns: tuple[str, ...], seed: int) -> ShardBatches:
        return ShardBatches(ray.train.get_dataset_shard(name), columns, encode, bs, cache=bool(freeze), seed=seed,
                            store=store)

    affectnet = source("affectnet", ("image",), config["seed"])
    fec = source("fec", ("i", "j", "k"), config["seed"] + 1)
    unlabeled = source("unlabeled", ("image",), config["seed"] + 2) if config.get("unlabeled") else None
    for epoch in epochs(config, start, optimizer):
        model.train()
        if freeze:
            core.prefix(freeze).eval()
        fec_iter = fec.cycle(epoch)
        unl_iter = unlabeled.cycle(epoch) if unlabeled is not None else None
        totals = {"loss": 0.0, "loss_rkd": 0.0, "loss_fec": 0.0, "loss_affectnet": 0.0, "accuracy": 0.0}
        steps = 0
        for step, batch in enumerate(affectnet.epoch(epoch)):
            maybe_fail(config, epoch, step)
            trip = next(fec_iter)
            parts = [batch["image"], trip["i"], trip["j"], trip["k"]]
            ids = [*batch["crop_id"], *trip["i_id"], *trip["j_id"], *trip["k_id"]]
            if unl_iter is not None:
                unl = next(unl_iter)
                parts.append(unl["image"])
                ids += list(unl["crop_id"])
            with autocast(device):  # one forward: DDP syncs BN buffers
                out = model(to_device(torch.cat(parts), device), after=freeze)
            out = type(out)(*(o.float() for o in out))
            na, n = len(batch["image"]), len(trip["i"])
            labels = torch.as_tensor(batch["label"]).long().to(device)
            logits = out.affectnet[:na]
            loss_aff = F.cross_entropy(logits, labels)
            e = out.fec[na:na + 3 * n]
            loss_fec = fec_triplet_loss(e[:n], e[n:2 * n], e[2 * n:],
                                        loss_cfg.margins(torch.as_tensor(trip["type"]).to(device)))
            loss = loss_fec + loss_cfg.affectnet_weight * loss_aff
            loss_rkd = torch.zeros((), device=device)
            if distill:
                target, mask = targets.lookup(ids)
                if int(mask.sum()) >= 3:
                    loss_rkd = rkd_loss(out.distill[mask.to(device)], target[mask].to(device),
                                        distance_weight=loss_cfg.rkd_distance_weight,
                                        angle_weight=loss_cfg.rkd_angle_weight)
                loss = loss + loss_rkd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["loss"] += loss.item()
            totals["loss_rkd"] += loss_rkd.item()
            totals["loss_fec"] += loss_fec.item()
            totals["loss_affectnet"] += loss_aff.item()
            totals["accuracy"] += (logits.argmax(1) == labels).float().mean().item()
            steps += 1
        core.eval()
        recalibrate_batchnorm(core, (b["image"].to(device) for b in affectnet.epoch(epoch)),
                              forward=lambda x: core(x, after=freeze))
        history = report_epoch(epoch, {k: v / max(steps, 1) for k, v in totals.items()}, model, optimizer, history)


def run(cfg: StudentTrainConfig) -> list[dict] | None:
    """Train (or resume) the student; returns the metric history, None when already finished."""
    if not begin(cfg, "train_student"):
        return None
    affectnet, fec = labelled_face_data(cfg)
    print(f"train_student: distillation {'on' if cfg.targets else 'off'}", flush=True)
    datasets = {"affectnet": affectnet, "fec": fec}
    if cfg.unlabeled:
        datasets["unlabeled"] = unlabeled_dataset(cfg.unlabeled, cfg.storage_options or None)
    loop = {"loss": asdict(cfg.loss)}
    history = fit(train_loop_per_worker, cfg, datasets, loop, lambda c: build_student({**c, "imagenet": None}))
    print(f"train_student: wrote {cfg.model_uri}", flush=True)
    return history
