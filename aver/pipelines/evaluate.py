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
from typing import Any, Callable

import numpy as np
import torch

from aver.console import Progress, init_ray
from aver.data.faces import Reading, affectnet_dataset, fec_dataset
from aver.data.manifests import affectnet_csv, affectnet_images_root
from aver.data.prefix_store import PrefixStore, prefix_store_folder
from aver.data.recola import SessionWindows, session_windows
from aver.io.parts import join
from aver.io.storage import absolute, exists, read_bytes, redact, write_bytes_atomic
from aver.metrics import balanced_logreg_accuracy, ccc, triplet_accuracy
from aver.models import Student, autocast, load_checkpoint, to_device

PAPER = {"affectnet_accuracy": 0.616, "fec_triplet_accuracy": 0.865,
         "ccc.arousal.fused": 0.719, "ccc.valence.fused": 0.740, "ccc.arousal.audio": 0.70,
         "ccc.valence.audio": 0.52, "ccc.arousal.visual": 0.57, "ccc.valence.visual": 0.66}


@dataclass
class EvaluateConfig:
    models: str
    """Folder of checkpoints: student.pt, fusion.pt, fusion_visual.pt, fusion_audio.pt, vggish_*.pt
    (others optional: student_nodistill.pt, teacher128.pt, teacher256.pt)."""
    data: str
    """Corpus root with affectnet/ (AffectNet as released: Manually_Annotated_file_lists/ and
    Manually_Annotated_Images/, or its CSVs beside the images), fec/ (the CSVs, images/ fetched by
    fetch_fec) and recola/ (AVEC 2016: recordings_audio/, recordings_video/, ratings_gold_standard/)."""
    output: str
    """Where metrics.json and metrics.md go."""
    affectnet_train: str | None = None
    """AffectNet split to fit the logistic regression on, relative to data (default: training.csv
    in affectnet/ or in affectnet/Manually_Annotated_file_lists/)."""
    affectnet_eval: str | None = None
    """AffectNet split to score (default: validation.csv, found as training.csv is)."""
    affectnet_images: str | None = None
    """AffectNet images, relative to data (default: Manually_Annotated_Images/ beside the CSVs or
    beside their folder)."""
    fec_eval: str = "fec/faceexp-comparison-data-test-public.csv"
    """FEC triplets to score (images fetched beside it)."""
    recola: str = "recola"
    """RECOLA root (AVEC 2016 layout), relative to data."""
    recola_split: str = "dev"
    """Sessions scored for CCC (the paper reports dev and test; test labels are withheld)."""
    window_s: float = SessionWindows.window_s
    """Fusion window, as trained."""
    fps: float = SessionWindows.fps
    """Face sampling rate, as trained."""
    prefix_cache: str | None = None
    """The students' training OUTPUT: face images whose frozen-prefix outputs its cache/ holds are
    not encoded again (None encodes every image)."""
    featurizers: int = 1
    """Most model actors embedding the face images, and most featurising the RECOLA sessions
    (MTCNN, student, VGGish); 0: no cap (the pools grow with the cluster)."""
    featurizer_cpus: float = SessionWindows.featurizer_cpus
    """CPUs per model actor."""
    featurizer_gpus: float = SessionWindows.featurizer_gpus
    """GPU share per model actor; 0 runs on CPU."""
    cpus_per_task: float = 1.0
    """CPUs per task reading and cropping face images (leave them room beside the model actors: on
    a 2-CPU machine, actors of 1.5 CPUs and tasks of 0.5)."""
    data_name: str = ""
    """What the data are, for the heading of the metrics table (default: the data folder)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options."""

    def __post_init__(self) -> None:
        for name in ("models", "data", "output", "prefix_cache"):  # tasks and actors run in other folders
            setattr(self, name, absolute(getattr(self, name)))


def _path(cfg: EvaluateConfig, rel: str) -> str:
    return rel if "://" in rel or os.path.isabs(rel) else join(cfg.data, rel)


class _FaceEmbedder:
    """Ray Data actor: face crops -> each student's ``head`` outputs for the image ``columns``. The
    backbone prefix the students share (a frozen stage of one initialisation) runs once per image,
    or is read from the students' training :class:`PrefixStore` (``prefix_cache``)."""

    def __init__(self, cfg: "EvaluateConfig", students: dict[str, str], columns: tuple[str, ...], head: str) -> None:
        import uuid

        from aver.io.streaming import actor_device

        torch.set_num_threads(max(1, int(round(cfg.featurizer_cpus))))  # Ray gives 1-CPU actors one thread
        self.device = actor_device(cfg.featurizer_gpus, "evaluate")
        so = cfg.storage_options or None
        self.students = {name: load_checkpoint(uri, storage_options=so)[0].to(self.device).eval()
                         for name, uri in students.items()}
        self.columns, self.head = columns, head
        first, *others = self.students.values()
        stages = [first.shared_stage(m) for m in others]
        self.stage = None if None in stages else min(stages, key=first.stages.index, default=None)
        self.prefix = first.prefix(self.stage) if self.stage else None
        self.store = None
        if self.stage and cfg.prefix_cache:  # read only: a rerun of evaluate skips the splits it finished
            self.store = PrefixStore(prefix_store_folder(cfg.prefix_cache, first, self.stage, Student.preprocess),
                                     f"evaluate-{uuid.uuid4().hex[:8]}", so, write=False)

    def _encode(self, images: np.ndarray) -> torch.Tensor:
        if self.store is not None:
            return to_device(self.store.encode(images, lambda im: self.prefix(Student.preprocess(im, self.device))),
                             self.device).float()
        x = Student.preprocess(images, self.device)
        return self.prefix(x) if self.prefix is not None else x

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        out = {"label": batch["label"]} if "label" in batch else {}
        with autocast(self.device):
            for column in self.columns:
                x = self._encode(batch[column])
                for name, model in self.students.items():
                    out[f"{name}.{column}"] = getattr(model(x, after=self.stage), self.head).float().cpu().numpy()
        return out


def _embeddings(cfg: "EvaluateConfig", students: dict[str, str], name: str, dataset: Callable, columns: tuple[str, ...],
                head: str, folder: str) -> dict[str, np.ndarray]:
    """``_FaceEmbedder`` outputs of the split ``dataset()`` (label included), from ``folder/name.npz``
    when an earlier run of the same students finished it, else computed by a pool of actors and saved."""
    import io

    so = cfg.storage_options or None
    uri = join(folder, f"{name}.npz")
    if exists(uri, so):
        with np.load(io.BytesIO(read_bytes(uri, so)), allow_pickle=False) as z:
            return dict(z)
    from ray.data import ActorPoolStrategy

    ds = dataset().map_batches(_FaceEmbedder, fn_constructor_kwargs={"cfg": cfg, "students": students, "columns": columns,
                                                              "head": head}, batch_size=64,
                        compute=ActorPoolStrategy(min_size=1, max_size=cfg.featurizers or None),
                        num_cpus=cfg.featurizer_cpus, num_gpus=cfg.featurizer_gpus)
    parts: dict[str, list] = {}
    progress = Progress(f"evaluate: {name}", None, "images" if columns == ("image",) else "triplets")
    for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
        progress.update(len(next(iter(b.values()))))
    progress.close()
    found = {k: np.concatenate(v) for k, v in parts.items()}
    buf = io.BytesIO()
    np.savez(buf, **found)
    write_bytes_atomic(uri, buf.getvalue(), so)
    return found


def face_metrics(cfg: EvaluateConfig, students: dict[str, str]) -> dict[str, dict[str, float]]:
    """AffectNet and FEC metrics per student (``{name: checkpoint}``). The images are read by CPU
    tasks and embedded by a pool of model actors (GPU with ``featurizer_gpus``), once for all
    students; each split's embeddings are saved as it finishes, so a rerun resumes after the last."""
    import hashlib

    so = cfg.storage_options or None
    h = hashlib.sha256()
    for name, uri in sorted(students.items()):
        h.update(name.encode() + hashlib.sha256(read_bytes(uri, so)).digest())
    # The key names the data as configured, not as found: a rerun reads saved splits with no data there.
    for rel in (cfg.affectnet_train or "affectnet/", cfg.affectnet_eval or "affectnet/", cfg.fec_eval,
                cfg.affectnet_images or "affectnet/"):
        h.update(_path(cfg, rel).encode())
    folder = join(cfg.output, "embeddings", h.hexdigest()[:16])

    reading = Reading(storage_options=so)

    def affectnet(split: str, rel: str | None):
        csv = _path(cfg, rel) if rel else affectnet_csv(_path(cfg, "affectnet"), split, so)
        images = _path(cfg, cfg.affectnet_images) if cfg.affectnet_images else affectnet_images_root(csv, so)
        return affectnet_dataset(csv, images, reading=reading, num_cpus=cfg.cpus_per_task)[0]

    tr, te = (_embeddings(cfg, students, f"affectnet_{split}", lambda name=name, rel=rel: affectnet(name, rel),
                          ("image",), "embedding", folder)
              for split, name, rel in (("train", "training", cfg.affectnet_train),
                                       ("eval", "validation", cfg.affectnet_eval)))
    e = _embeddings(cfg, students, "fec_eval",
                    lambda: fec_dataset(_path(cfg, cfg.fec_eval), reading=reading, num_cpus=cfg.cpus_per_task)[0],
                    ("i", "j", "k"), "fec", folder)
    return {name: {"affectnet_accuracy": balanced_logreg_accuracy(tr[f"{name}.image"], tr["label"],
                                                                  te[f"{name}.image"], te["label"]),
                   "fec_triplet_accuracy": triplet_accuracy(e[f"{name}.i"], e[f"{name}.j"], e[f"{name}.k"])}
            for name in students}


@torch.no_grad()
def recola_metrics(cfg: EvaluateConfig, fusion_models: dict[str, str]) -> dict[str, float]:
    so = cfg.storage_options or None
    c = SessionWindows(recola=_path(cfg, cfg.recola), student=join(cfg.models, "student.pt"),
                       vggish_arousal=join(cfg.models, "vggish_arousal.pt"),
                       vggish_valence=join(cfg.models, "vggish_valence.pt"), window_s=cfg.window_s, fps=cfg.fps,
                       featurizers=cfg.featurizers, featurizer_cpus=cfg.featurizer_cpus,
                       featurizer_gpus=cfg.featurizer_gpus, storage_options=cfg.storage_options)
    c.features_cache = join(cfg.output, "features", c.features_key())  # a rerun featurises only what is missing
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


def markdown(metrics: dict[str, float], data: str) -> str:
    """The metrics beside the paper's, each column saying whose they are: the paper's figures are
    on the real AffectNet / FEC / RECOLA splits and compare with this run's only on the same data."""
    rows = [f"| metric | this run ({data}) | paper (AffectNet / FEC / RECOLA) |", "|---|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            paper = PAPER.get(key)
            rows.append(f"| {key} | {value:.3f} | {paper:.3f} |" if paper is not None else f"| {key} | {value:.3f} | |")
    note = ("\nThe two columns are not comparable unless this run's data are the paper's splits "
            "(AffectNet validation, FEC test, RECOLA dev).\n")
    return "\n".join(rows) + "\n" + note


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Compute every metric whose models are present; writes metrics.json and metrics.md."""
    init_ray()
    so = cfg.storage_options or None
    metrics: dict[str, Any] = {}
    students = {name: join(cfg.models, f"{name}.pt") for name in ("student", "student_nodistill")
                if exists(join(cfg.models, f"{name}.pt"), so)}
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
    table = markdown(metrics, cfg.data_name or redact(cfg.data))
    write_bytes_atomic(join(cfg.output, "metrics.md"), table.encode(), cfg.storage_options)
    print(table, flush=True)
    return nested
