"""distill: face crops -> two teachers -> 80-d distillation targets (paper §3.1.2).

The target of a crop is ``[t1.fec, t1.affectnet, t2.fec, t2.affectnet]`` with each part
L2-normalised. Inputs are ``faces/`` parts from extract_faces (one output part per input part)
or image folders (chunks of images); outputs are ``targets/<unit>.parquet`` and then
``status/<unit>.parquet``, both atomic, so reruns skip finished units and never duplicate rows.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from aver.datasets import is_affectnet_csv, is_fec_csv, read_affectnet, read_fec
from aver.faces import crop_face
from aver.media import IMAGE_EXTENSIONS, MediaError, list_inputs, load_image
from aver.outputs import join, status_table, write_table
from aver.storage import redact, url_to_fs
from aver.streaming import chunked, prefetch
from aver.units import ActorPoolConfig, actor_device, actor_threads, map_units, pending, stable_chunks

TARGETS_SCHEMA = pa.schema([("crop_id", pa.string()), ("target", pa.list_(pa.float32(), 80))])
TEACHER_SIZE = 140


@dataclass
class DistillConfig(ActorPoolConfig):
    input: str
    """faces/ folder of extract_faces (or its parent), or a folder/glob/manifest of face images."""
    teachers: tuple[str, str]
    """Two aver Teacher checkpoints (d_face 128 and 256 in the paper)."""
    output: str
    """Output folder; gets targets/ and status/."""
    batch_size: int = 256
    """Crops per teacher forward pass."""
    images_per_unit: int = 1024
    """Crops handled (and written) together when the input is images or a manifest."""
    images_root: str | None = None
    """Image folder of an AffectNet CSV (default: the CSV's folder) or of fetched FEC images
    (default: images/ beside the CSV)."""
    margin: float = 0.2
    """Context around manifest face boxes, as for extract_faces crops."""
    precision: str = "auto"
    """'bf16' autocast, 'fp32', or 'auto' (bf16 on CUDA, fp32 on CPU)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.teachers = tuple(self.teachers)
        if len(self.teachers) != 2:
            raise ValueError(f"distill needs exactly two teacher checkpoints, got {len(self.teachers)}")
        if self.batch_size < 1 or self.images_per_unit < 1:
            raise ValueError("batch_size >= 1 and images_per_unit >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


def teacher_targets(out1, out2) -> torch.Tensor:
    """``[B,80]``: the four teacher outputs, each L2-normalised, concatenated."""
    parts = [out1.fec, out1.affectnet, out2.fec, out2.affectnet]
    return torch.cat([torch.nn.functional.normalize(p.float(), dim=1) for p in parts], dim=1)


def preprocess(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 RGB crops -> ``[B,3,140,140]`` float with facenet standardisation, channels_last."""
    from PIL import Image

    arr = np.stack([im if im.shape[:2] == (TEACHER_SIZE, TEACHER_SIZE)
                    else np.asarray(Image.fromarray(im).resize((TEACHER_SIZE,) * 2, Image.BILINEAR)) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    x = (x.float() - 127.5) / 128.0
    return x.contiguous(memory_format=torch.channels_last)


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _crop_entries(cfg: DistillConfig) -> tuple[str, list[dict], int]:
    """What to crop for a non-faces/ input: (prefix, entries, rejected manifest rows)."""
    if is_affectnet_csv(cfg.input, cfg.storage_options):
        m = read_affectnet(cfg.input, cfg.images_root, cfg.storage_options)
        return "affectnet", [{"crop_id": r["crop_id"], "source": r["source"], "box": r["box"]} for r in m.records], \
            len(m.rejected)
    if is_fec_csv(cfg.input, cfg.storage_options):
        m = read_fec(cfg.input, cfg.images_root, cfg.storage_options)
        unique = {f["crop_id"]: f for r in m.records for f in r["faces"]}
        return "fec", [{"crop_id": f["crop_id"], "source": f["source"], "box_frac": f["box_frac"]}
                       for f in sorted(unique.values(), key=lambda f: f["crop_id"])], len(m.rejected)
    images = [i for i in list_inputs(cfg.input, cfg.storage_options, IMAGE_EXTENSIONS) if i.kind == "image"]
    return "images", [{"crop_id": i.item_id, "source": i.source} for i in images], 0


def plan_units(cfg: DistillConfig) -> list[dict]:
    """One unit per faces/ part, or chunks of crops (AffectNet / FEC manifests, image folders);
    unit ids are stable for the same input."""
    fs, path = url_to_fs(cfg.input, cfg.storage_options)
    fs.invalidate_cache()
    protocol = cfg.input.split("://", 1)[0] + "://" if "://" in cfg.input else ""
    if fs.isdir(path):
        if fs.isdir(path.rstrip("/") + "/faces"):
            path = path.rstrip("/") + "/faces"
        parts = sorted(p for p in fs.ls(path, detail=False)
                       if p.endswith(".parquet") and not os.path.basename(p).startswith("."))
        if parts:
            return [{"unit_id": os.path.basename(p)[: -len(".parquet")], "kind": "faces",
                     "payload": json.dumps(protocol + p)} for p in parts]
    prefix, entries, rejected = _crop_entries(cfg)
    if rejected:
        print(f"distill: {rejected} manifest rows rejected (malformed or unused labels)", flush=True)
    return [{"unit_id": uid, "kind": "crops", "payload": json.dumps(entries[part])}
            for uid, part in stable_chunks([e["crop_id"] for e in entries], cfg.images_per_unit, prefix)]


class TeacherPair:
    """Ray Data actor: both teachers on one device; turns whole units into target parts."""

    def __init__(self, cfg: DistillConfig) -> None:
        from aver.models import Teacher, load_checkpoint, same_weights

        self.cfg = cfg
        actor_threads(cfg.cpus_per_actor)
        self.device = actor_device(cfg.gpus_per_actor, "distill TeacherPair")
        self.teachers = []
        for uri in cfg.teachers:
            model, _ = load_checkpoint(uri, storage_options=cfg.storage_options)
            if not isinstance(model, Teacher):
                raise ValueError(f"{redact(uri)} holds a {type(model).__name__}, not a Teacher")
            self.teachers.append(model.to(self.device, memory_format=torch.channels_last).eval())
        # The paper's teachers start from the same FaceNet trunk; frozen, it stays the same: run it once.
        self.shared_trunk = all(same_weights(self.teachers[0].trunk, t.trunk) for t in self.teachers[1:])
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    @torch.inference_mode()
    def targets(self, images: list[np.ndarray]) -> np.ndarray:
        x = preprocess(images, self.device)
        with self.autocast:
            if self.shared_trunk:
                trunk = self.teachers[0].trunk(x)
                out = [t(trunk, after="trunk") for t in self.teachers]
            else:
                out = [t(x) for t in self.teachers]
        return teacher_targets(*out).cpu().numpy()

    def _crops(self, unit: dict):
        """(crop ids, images, status rows) of a unit, streamed in batches."""
        so = self.cfg.storage_options
        if unit["kind"] == "faces":
            fs, path = url_to_fs(json.loads(unit["payload"]), so)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["crop_id", "crop"])
            table = table.filter(pc.is_valid(table["crop"]))
            ids, crops = table["crop_id"].to_pylist(), table["crop"].to_pylist()
            for batch in chunked(zip(ids, crops), self.cfg.batch_size):
                yield [i for i, _ in batch], [_decode_jpeg(c) for _, c in batch], []
        else:
            for batch in chunked(iter(json.loads(unit["payload"])), self.cfg.batch_size):
                ids, images, statuses = [], [], []
                for entry in batch:
                    row = {"item_id": entry["crop_id"], "source": redact(entry["source"])}
                    try:
                        image = load_image(entry["source"], storage_options=so)
                        box = entry.get("box")
                        if entry.get("box_frac"):
                            h, w = image.shape[:2]
                            x1, y1, x2, y2 = entry["box_frac"]
                            box = (x1 * w, y1 * h, x2 * w, y2 * h)
                        images.append(crop_face(image, box, size=TEACHER_SIZE, margin=self.cfg.margin)
                                      if box else image)
                        ids.append(entry["crop_id"])
                        statuses.append({**row, "status": "ok", "n_frames": 1})
                    except MediaError as e:
                        statuses.append({**row, "status": e.status, "error": str(e), "n_frames": 0})
                yield ids, images, statuses

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"unit_id": [], "status": [], "n_crops": []}
        for unit in ({k: batch[k][i] for k in batch} for i in range(len(batch["unit_id"]))):
            ids, targets, statuses = [], [], []
            unit_source = redact(json.loads(unit["payload"]) if unit["kind"] == "faces" else unit["unit_id"])
            try:
                for crop_ids, images, rows in prefetch(self._crops(unit)):
                    statuses += rows
                    if images:
                        targets.append(self.targets(images))
                        ids += crop_ids
                if unit["kind"] == "faces":
                    statuses = [{"item_id": unit["unit_id"], "source": unit_source, "status": "ok",
                                 "n_frames": len(ids)}]
            except Exception as e:  # noqa: BLE001 - an unreadable part is a status row, not a crash
                ids, targets = [], []
                statuses = [{"item_id": unit["unit_id"], "source": unit_source, "status": "corrupt",
                             "error": f"{type(e).__name__}: {e}", "n_frames": 0}]
            matrix = np.concatenate(targets) if targets else np.zeros((0, 80), np.float32)
            table = pa.table({"crop_id": pa.array(ids, pa.string()),
                              "target": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), 80)},
                             schema=TARGETS_SCHEMA)
            so = self.cfg.storage_options
            write_table(join(self.cfg.output, "targets", f"{unit['unit_id']}.parquet"), table, so)
            write_table(join(self.cfg.output, "status", f"{unit['unit_id']}.parquet"),
                        status_table(statuses, id_column="item_id"), so)
            out["unit_id"].append(unit["unit_id"])
            out["status"].append(",".join(sorted({s["status"] for s in statuses})) or "empty")
            out["n_crops"].append(len(ids))
        return out


def run(cfg: DistillConfig) -> int:
    """Run on the current Ray cluster (a local one if none); returns the number of targets written now."""
    units = plan_units(cfg)
    todo = pending(units, cfg.output, cfg.storage_options)
    print(f"distill: {len(units)} units; {len(units) - len(todo)} already complete, {len(todo)} to do", flush=True)
    if not todo:
        return 0
    total = 0
    for batch in map_units(todo, TeacherPair, cfg):
        total += int(batch["n_crops"].sum())
        for unit, status in zip(batch["unit_id"], batch["status"]):
            if status != "ok":
                print(f"  {unit}: {status}", flush=True)
    print(f"distill: wrote {total} targets", flush=True)
    return total
