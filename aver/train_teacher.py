"""train_teacher: Algorithm 1 — joint FEC triplet + alpha * AffectNet cross-entropy from the
FaceNet trunk, data-parallel on Ray Train."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from aver.face_data import FaceTrainConfig, labelled_face_data, to_teacher_input
from aver.losses import FaceLossConfig, fec_triplet_loss
from aver.training import (ShardBatches, autocast, begin, epochs, fit, input_encoder, maybe_fail, prepare_worker,
                           recalibrate_batchnorm, report_epoch, to_device)


@dataclass
class TeacherTrainConfig(FaceTrainConfig):
    d_face: int = 128
    """Face embedding width (the paper's two teachers: 128 and 256)."""
    facenet: str | None = None
    """facenet-pytorch VGGFace2 weights for the trunk (registry name or URI); None = random init."""
    freeze: str | None = None
    """"trunk": train only the layers after the trunk, whose outputs are computed once and cached
    (fast recipe; the trunk keeps its weights and BN statistics). None trains everything."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_face < 1:
            raise ValueError("d_face must be positive")
        if self.freeze not in (None, "trunk"):
            raise ValueError(f"freeze must be None or 'trunk', got {self.freeze!r}")


def build_teacher(config: dict) -> torch.nn.Module:
    from aver.models import Teacher

    if config.get("facenet"):
        return Teacher.from_facenet(config["facenet"], d_face=config["d_face"],
                                    storage_options=config.get("storage_options") or None)
    return Teacher(d_face=config["d_face"])


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    freeze = config["freeze"]
    model, core, optimizer, start, history, device = prepare_worker(build_teacher, config, freeze=freeze)
    loss_cfg = FaceLossConfig(**config["loss"])
    bs = config["batch_size"]
    encode, store = input_encoder(config, core, freeze, to_teacher_input, device)

    affectnet = ShardBatches(ray.train.get_dataset_shard("affectnet"), ("image",), encode, bs,
                             cache=bool(freeze), seed=config["seed"], store=store)
    fec = ShardBatches(ray.train.get_dataset_shard("fec"), ("i", "j", "k"), encode, bs, cache=bool(freeze),
                       seed=config["seed"] + 1, store=store)
    for epoch in epochs(config, start, optimizer):
        model.train()
        if freeze:
            core.prefix(freeze).eval()
        fec_iter = fec.cycle(epoch)
        totals = {"loss": 0.0, "loss_fec": 0.0, "loss_affectnet": 0.0, "accuracy": 0.0, "triplet_accuracy": 0.0}
        steps = 0
        for step, batch in enumerate(affectnet.epoch(epoch)):
            maybe_fail(config, epoch, step)
            triplets = next(fec_iter)
            # One forward pass over both batches: DDP syncs BN buffers on every forward.
            na, n = batch["image"].shape[0], triplets["i"].shape[0]
            x = torch.cat([batch["image"], triplets["i"], triplets["j"], triplets["k"]])
            with autocast(device):
                out = model(to_device(x, device), after=freeze)
            out = type(out)(*(o.float() for o in out))
            labels = torch.as_tensor(batch["label"]).long().to(device)
            logits = out.affectnet[:na]
            loss_aff = F.cross_entropy(logits, labels)
            e_i, e_j, e_k = out.fec[na:na + n], out.fec[na + n:na + 2 * n], out.fec[na + 2 * n:]
            loss_fec = fec_triplet_loss(e_i, e_j, e_k, loss_cfg.margins(torch.as_tensor(triplets["type"]).to(device)))
            loss = loss_fec + loss_cfg.affectnet_weight * loss_aff
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                d = lambda a, b: (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1)  # noqa: E731
                correct = ((d(e_i, e_j) < d(e_i, e_k)) & (d(e_i, e_j) < d(e_j, e_k))).float().mean()
            totals["loss"] += loss.item()
            totals["loss_fec"] += loss_fec.item()
            totals["loss_affectnet"] += loss_aff.item()
            totals["accuracy"] += (logits.argmax(1) == labels).float().mean().item()
            totals["triplet_accuracy"] += correct.item()
            steps += 1
        core.eval()
        recalibrate_batchnorm(core, (b["image"].to(device) for b in affectnet.epoch(epoch)),
                              forward=lambda x: core(x, after=freeze))
        history = report_epoch(epoch, {k: v / max(steps, 1) for k, v in totals.items()}, model, optimizer, history)


def run(cfg: TeacherTrainConfig) -> list[dict] | None:
    """Train (or resume) the teacher; returns the metric history, None when already finished."""
    if not begin(cfg, "train_teacher"):
        return None
    affectnet, fec = labelled_face_data(cfg)
    loop = {"loss": asdict(cfg.loss)}
    datasets = {"affectnet": affectnet.select_columns(["image", "label"]),
                "fec": fec.select_columns(["i", "j", "k", "type"])}
    history = fit(train_loop_per_worker, cfg, datasets, loop,
                  lambda c: build_teacher({**c, "d_face": cfg.d_face, "facenet": None}))
    print(f"train_teacher: wrote {cfg.model_uri}", flush=True)
    return history
