"""evaluate: the paper's protocols on held-out data (Tables 1-5).

AffectNet accuracy: class-balanced logistic regression on frozen student embeddings, fit on the
training split, scored on the validation split (Table 1). FEC: triplet accuracy of the student's
FEC head on the test triplets (Table 2). RECOLA: CCC of arousal and valence on the dev sessions
for the fused, visual-only and audio-only fusion models (Tables 3-5).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aver.data.faces import affectnet_dataset, fec_dataset
from aver.data.prefix_store import PrefixStore, prefix_store_folder
from aver.data.recola import SessionWindows, session_windows
from aver.io.parts import join
from aver.io.storage import exists, write_bytes_atomic
from aver.metrics import balanced_logreg_accuracy, ccc, triplet_accuracy
from aver.models import Student, load_checkpoint

PAPER = {"affectnet_accuracy": 0.616, "fec_triplet_accuracy": 0.865,
         "ccc.arousal.fused": 0.719, "ccc.valence.fused": 0.740, "ccc.arousal.audio": 0.70,
         "ccc.valence.audio": 0.52, "ccc.arousal.visual": 0.57, "ccc.valence.visual": 0.66}


@dataclass
class EvaluateConfig:
    models: str
    """Folder of checkpoints: student.pt, fusion.pt, fusion_visual.pt, fusion_audio.pt, vggish_*.pt
    (others optional: student_nodistill.pt, teacher128.pt, teacher256.pt)."""
    data: str
    """Corpus root with affectnet/, fec/, recola/ in the real layouts."""
    output: str
    """Where metrics.json and metrics.md go."""
    affectnet_train: str = "affectnet/training.csv"
    """AffectNet split to fit the logistic regression on, relative to data."""
    affectnet_eval: str = "affectnet/validation.csv"
    """AffectNet split to score."""
    affectnet_images: str = "affectnet/Manually_Annotated_Images"
    """AffectNet images, relative to data."""
    fec_eval: str = "fec/faceexp-comparison-data-test-public.csv"
    """FEC triplets to score (images fetched beside it)."""
    recola: str = "recola"
    """RECOLA root, relative to data."""
    recola_split: str = "dev"
    """Sessions scored for CCC (the paper reports dev and test; test labels are withheld)."""
    window_s: float = SessionWindows.window_s
    """Fusion window, as trained."""
    fps: float = SessionWindows.fps
    """Face sampling rate, as trained."""
    prefix_cache: str | None = None
    """The students' training OUTPUT: face images whose frozen-prefix outputs its cache/ holds are
    not encoded again (None encodes every image)."""
    featurizer_cpus: float = SessionWindows.featurizer_cpus
    """CPUs of the actor featurising the RECOLA sessions (MTCNN, student, VGGish)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options."""


def _path(cfg: EvaluateConfig, rel: str) -> str:
    return rel if "://" in rel or os.path.isabs(rel) else join(cfg.data, rel)


@torch.no_grad()
def _embed(students: dict, encode, stage: str | None, batches, keys: tuple[str, ...], head: str) -> tuple[dict, list]:
    """{student: {key: outputs of ``head``}} over ``batches``; ``encode`` gives the model inputs
    after ``stage`` (the prefix the students share, run once per image)."""
    out = {name: {k: [] for k in keys} for name in students}
    labels = []
    for b in batches:
        for k in keys:
            x = encode(b[k])
            for name, model in students.items():
                out[name][k].append(getattr(model(x, after=stage), head).float().numpy())
        labels.append(b.get("label"))
    return {n: {k: np.concatenate(v) for k, v in o.items()} for n, o in out.items()}, labels


def face_metrics(cfg: EvaluateConfig, students: dict) -> dict[str, dict[str, float]]:
    """AffectNet and FEC metrics per student. The images are read once for all students, and the
    backbone prefix they share (a frozen stage of one initialisation) runs once."""
    import uuid

    so = cfg.storage_options or None
    students = {name: model.eval() for name, model in students.items()}
    first, *others = students.values()
    stages = [first.shared_stage(m) for m in others]
    stage = None if None in stages else min(stages, key=first.stages.index, default=None)
    store = None
    if stage and cfg.prefix_cache:
        store = PrefixStore(prefix_store_folder(cfg.prefix_cache, first, stage, Student.preprocess),
                            f"evaluate-{uuid.uuid4().hex[:8]}", so)

    def encode(images):
        if store is not None:
            return store.encode(images, lambda im: first.prefix(stage)(Student.preprocess(im))).float()
        x = Student.preprocess(images)
        return first.prefix(stage)(x) if stage else x

    images = _path(cfg, cfg.affectnet_images)
    train, _ = affectnet_dataset(_path(cfg, cfg.affectnet_train), images, storage_options=so)
    test, _ = affectnet_dataset(_path(cfg, cfg.affectnet_eval), images, storage_options=so)
    x_tr, y_tr = _embed(students, encode, stage, train.iter_batches(batch_size=64, batch_format="numpy"), ("image",),
                        "embedding")
    x_te, y_te = _embed(students, encode, stage, test.iter_batches(batch_size=64, batch_format="numpy"), ("image",),
                        "embedding")
    fec, _ = fec_dataset(_path(cfg, cfg.fec_eval), storage_options=so)
    e, _ = _embed(students, encode, stage, fec.select_columns(["i", "j", "k"]).iter_batches(batch_size=64,
                  batch_format="numpy"), ("i", "j", "k"), "fec")
    if store is not None:
        store.save()
    return {name: {"affectnet_accuracy": balanced_logreg_accuracy(x_tr[name]["image"], np.concatenate(y_tr),
                                                                  x_te[name]["image"], np.concatenate(y_te)),
                   "fec_triplet_accuracy": triplet_accuracy(e[name]["i"], e[name]["j"], e[name]["k"])}
            for name in students}


@torch.no_grad()
def recola_metrics(cfg: EvaluateConfig, fusion_models: dict[str, str]) -> dict[str, float]:
    so = cfg.storage_options or None
    c = SessionWindows(recola=_path(cfg, cfg.recola), student=join(cfg.models, "student.pt"),
                       vggish_arousal=join(cfg.models, "vggish_arousal.pt"),
                       vggish_valence=join(cfg.models, "vggish_valence.pt"), window_s=cfg.window_s, fps=cfg.fps,
                       featurizer_cpus=cfg.featurizer_cpus, storage_options=cfg.storage_options)
    windows = session_windows(c, cfg.recola_split)
    batches = list(windows.iter_batches(batch_size=256, batch_format="numpy"))
    visual = torch.from_numpy(np.concatenate([b["visual"] for b in batches]))
    audio = torch.from_numpy(np.concatenate([b["audio"] for b in batches]))
    target = np.concatenate([b["target"] for b in batches])
    out = {}
    for variant, uri in fusion_models.items():
        model, _ = load_checkpoint(uri, storage_options=so)
        pred = torch.cat([model(visual[s:s + 256], audio[s:s + 256]) for s in range(0, len(visual), 256)]).numpy()
        out[f"ccc.arousal.{variant}"] = ccc(target[:, 0], pred[:, 0])
        out[f"ccc.valence.{variant}"] = ccc(target[:, 1], pred[:, 1])
    return out


def markdown(metrics: dict[str, float]) -> str:
    rows = ["| metric | aver | paper |", "|---|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            paper = PAPER.get(key)
            rows.append(f"| {key} | {value:.3f} | {paper:.3f} |" if paper is not None else f"| {key} | {value:.3f} | |")
    return "\n".join(rows) + "\n"


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Compute every metric whose models are present; writes metrics.json and metrics.md."""
    import ray

    if not ray.is_initialized():
        ray.init()
    so = cfg.storage_options or None
    metrics: dict[str, Any] = {}
    students = {name: load_checkpoint(join(cfg.models, f"{name}.pt"), storage_options=so)[0]
                for name in ("student", "student_nodistill") if exists(join(cfg.models, f"{name}.pt"), so)}
    if students:
        for name, found in face_metrics(cfg, students).items():
            prefix = "" if name == "student" else f"{name}."
            metrics.update({f"{prefix}{k}": v for k, v in found.items()})
    fusion = {v: join(cfg.models, f) for v, f in (("fused", "fusion.pt"), ("visual", "fusion_visual.pt"),
                                                  ("audio", "fusion_audio.pt")) if exists(join(cfg.models, f), so)}
    if fusion:
        metrics.update(recola_metrics(cfg, fusion))
    nested: dict[str, Any] = {k: v for k, v in metrics.items() if not k.startswith("ccc.")}
    for key, value in metrics.items():
        if key.startswith("ccc."):
            _, dim, variant = key.split(".")
            nested.setdefault("ccc", {}).setdefault(dim, {})[variant] = value
    write_bytes_atomic(join(cfg.output, "metrics.json"), json.dumps(nested, indent=1).encode(), cfg.storage_options)
    table = markdown(metrics)
    write_bytes_atomic(join(cfg.output, "metrics.md"), table.encode(), cfg.storage_options)
    print(table, flush=True)
    return nested
