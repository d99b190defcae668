"""distill: face crops -> two teachers -> 80-d distillation targets (paper §3.1.2).

The target of a crop is ``[t1.fec, t1.affectnet, t2.fec, t2.affectnet]`` with each part
L2-normalised. Inputs are ``faces/`` parts from extract_faces (one output part per input part)
or image folders (chunks of images); outputs are ``targets/<unit>.parquet`` and then
``status/<unit>.parquet``, both atomic, so reruns skip finished units and never duplicate rows.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from aver.constants import CROP_SIZE
from aver.data.manifests import is_affectnet_csv, is_fec_csv, read_affectnet, read_fec
from aver.faces import crop_face
from aver.faults import MediaError, is_transient, with_retries
from aver.io.media import IMAGE_EXTENSIONS, InputItem, items_in_listing, list_inputs, load_image
from aver.io.storage import redact, url_to_fs
from aver.models import StudentConfig, Teacher, autocast, load_checkpoint, same_weights
from aver.models._base import resize_crops
from aver.pipelines.units import (ActorPoolConfig, ModelStage, Plan, actor_setup, commit, connect, guarded_map, plan,
                                  run_stages, summarise)

DISTILL_DIM = StudentConfig.distill_dim
"""Width of a target: [t1.fec, t1.affectnet, t2.fec, t2.affectnet], what the student's distill head learns."""
TARGETS_SCHEMA = pa.schema([("crop_id", pa.string()), ("target", pa.list_(pa.float32(), DISTILL_DIM))])


@dataclass
class DistillConfig(ActorPoolConfig):
    uri_fields = ("input", "output")

    input: str
    """faces/ folder of extract_faces (or its parent), an AffectNet training.csv / validation.csv,
    a Google FEC CSV (images fetched beside it), or a folder/glob/manifest of face images."""
    teachers: tuple[str, str]
    """Two aver Teacher checkpoints (d_face 128 and 256 in the paper)."""
    output: str
    """Output folder; gets targets/ and status/."""
    batch_size: int = 256
    """Crops per teacher forward pass (gathered across units)."""
    records_per_call: int = field(default=1, kw_only=True)
    """Units one model-actor call takes: a unit already holds hundreds of crops, and a call that
    waited for several would idle the actor while they load."""
    images_per_unit: int = 1024
    """Crops handled (and written) together when the input is images or a manifest."""
    images_root: str | None = None
    """Image folder of an AffectNet CSV (default: Manually_Annotated_Images/ beside the CSV, else
    beside the CSV's folder) or of fetched FEC images (default: images/ beside the CSV)."""
    margin: float = 0.2
    """Context around manifest face boxes, as for extract_faces crops."""
    precision: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32")})
    """'bf16' autocast, 'fp32', or 'auto' (bf16 on CUDA, fp32 on CPU)."""

    def storage_uris(self) -> list[tuple[str, str]]:
        return super().storage_uris() + [("teachers", t) for t in self.teachers]

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


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _crop_entries(cfg: DistillConfig, listing: list[InputItem] | None) -> tuple[str, list[dict], int]:
    """What to crop for a non-faces/ input: (prefix, entries, rejected manifest rows)."""
    if is_affectnet_csv(cfg.input, cfg.storage_options):
        m = read_affectnet(cfg.input, cfg.images_root, cfg.storage_options)
        return "affectnet", [{"item_id": r["crop_id"], "source": r["source"], "box": r["box"]} for r in m.records], \
            len(m.rejected)
    if is_fec_csv(cfg.input, cfg.storage_options):
        m = read_fec(cfg.input, cfg.images_root, cfg.storage_options)
        unique = {f["crop_id"]: f for r in m.records for f in r["faces"]}
        return "fec", [{"item_id": f["crop_id"], "source": f["source"], "box_frac": f["box_frac"]}
                       for f in sorted(unique.values(), key=lambda f: f["crop_id"])], len(m.rejected)
    images = [i for i in (listing if listing is not None else list_inputs(cfg.input, cfg.storage_options,
                                                                           IMAGE_EXTENSIONS)) if i.kind == "image"]
    return "images", [{"item_id": i.item_id, "source": i.source, "refusal": i.refusal} for i in images], 0


def plan_units(cfg: DistillConfig) -> Plan:
    """One unit per faces/ part, or chunks of pending crops (AffectNet / FEC manifests, image
    folders); unit ids never depend on positions (see :mod:`aver.pipelines.units`)."""
    fs, path = url_to_fs(cfg.input, cfg.storage_options)
    fs.invalidate_cache()
    protocol = cfg.input.split("://", 1)[0] + "://" if "://" in cfg.input else ""
    listing = None
    if fs.isdir(path):  # one recursive listing: faces/ parts if there are any, else the images in it
        root = path.rstrip("/")
        files = fs.find(root)
        parts = {folder: sorted(p for p in files if os.path.dirname(p) == folder and p.endswith(".parquet")
                                and not os.path.basename(p).startswith(".")) for folder in (root + "/faces", root)}
        found = parts[root + "/faces"] or parts[root]
        if found:
            names = [os.path.basename(p)[: -len(".parquet")] for p in found]
            return plan(cfg.output, cfg.storage_options, id_column="item_id",
                        singles=[(n, {"item_id": n, "source": protocol + p, "kind": "faces"})
                                 for n, p in zip(names, found)])
        listing = items_in_listing(cfg.input, files, IMAGE_EXTENSIONS)
    prefix, entries, rejected = _crop_entries(cfg, listing)
    if rejected:
        print(f"distill: {rejected} manifest rows rejected (malformed or unused labels)", flush=True)
    return plan(cfg.output, cfg.storage_options, singles=[], chunked=[(e["item_id"], e) for e in entries],
                prefix=prefix, per_unit=cfg.images_per_unit, id_column="item_id", output_folders=("targets",))


def _read_faces_part(uri: str, storage_options) -> pa.Table:
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["crop_id", "crop"])
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, OSError) and is_transient(e):
            raise
        raise MediaError("corrupt", f"{redact(uri)} is not a faces part: {type(e).__name__}: {e}") from None
    return table.filter(pc.is_valid(table["crop"]))


def load_unit(unit: dict, cfg: DistillConfig) -> dict:
    """Load stage (CPU task): a unit's crops as one ``[n,140,140,3]`` array with their ids. A faces
    part is one GET whose undecodable crops are skipped and counted; a chunk of images reads
    ``io_threads`` at a time, each read, retried and judged on its own (its status row)."""
    so = cfg.storage_options
    if unit["items"][0].get("kind") == "faces":
        item = unit["items"][0]
        table = with_retries(lambda: _read_faces_part(item["source"], so), cfg.retry, item["source"])
        ids, images, skipped = [], [], []
        for crop_id, data in zip(table["crop_id"].to_pylist(), table["crop"].to_pylist()):
            try:
                images.append(_decode_jpeg(data))
                ids.append(crop_id)
            except Exception as e:  # noqa: BLE001 - one bad crop costs itself only
                skipped.append(f"{crop_id}: {type(e).__name__}")
        return {"unit": unit, "ids": ids, "images": resize_crops(images), "skipped": skipped}

    def load(entry: dict) -> np.ndarray:
        InputItem(entry["source"], entry["item_id"], "image", entry.get("refusal")).check()
        image = load_image(entry["source"], storage_options=so)
        box, frac = entry.get("box"), entry.get("box_frac")
        if frac is not None:
            h, w = image.shape[:2]
            box = (frac[0] * w, frac[1] * h, frac[2] * w, frac[3] * h)
        return crop_face(image, box, size=CROP_SIZE, margin=cfg.margin) if box is not None else image

    loaded = guarded_map(load, unit["items"], cfg, lambda e: e["source"])
    ids, images, statuses = [], [], []
    for entry, (image, failure) in zip(unit["items"], loaded):
        row = {"item_id": entry["item_id"], "source": redact(entry["source"])}
        if failure:
            statuses.append({**row, "status": failure[0], "error": failure[1], "n_frames": 0})
        else:
            images.append(image)
            ids.append(entry["item_id"])
            statuses.append({**row, "status": "ok", "n_frames": 1})
    return {"unit": unit, "ids": ids, "images": resize_crops(images), "statuses": statuses}


class TeacherPair(ModelStage):
    """Model stage (Ray Data actor): both teachers on one device; the crops of several units go
    through them in batches of ``batch_size``."""

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.device = actor_setup(cfg, "distill TeacherPair")
        self.teachers = []
        for uri in cfg.teachers:
            model, _ = load_checkpoint(uri, storage_options=cfg.storage_options)
            if not isinstance(model, Teacher):
                raise ValueError(f"{redact(uri)} holds a {type(model).__name__}, not a Teacher")
            self.teachers.append(model.to(self.device, memory_format=torch.channels_last).eval())
        # The paper's teachers start from the same FaceNet trunk; frozen, it stays the same: run it once.
        self.shared_trunk = all(same_weights(self.teachers[0].trunk, t.trunk) for t in self.teachers[1:])
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = autocast(self.device, enabled=use_bf16)

    @torch.inference_mode()
    def targets(self, images: np.ndarray) -> np.ndarray:
        x = Teacher.preprocess(images, self.device)
        with self.autocast:
            if self.shared_trunk:
                trunk = self.teachers[0].trunk(x)
                out = [t(trunk, after="trunk") for t in self.teachers]
            else:
                out = [t(x) for t in self.teachers]
        return teacher_targets(*out).cpu().numpy()

    def run(self, records: list[dict]) -> None:
        images = np.concatenate([r["images"] for r in records])
        size = self.cfg.batch_size
        out = [self.targets(images[s:s + size]) for s in range(0, len(images), size)]
        targets = np.concatenate(out) if out else np.zeros((0, DISTILL_DIM), np.float32)
        start = 0
        for r in records:
            r["targets"] = targets[start:start + len(r["ids"])]
            start += len(r["ids"])


def write_unit(records: list[dict], cfg: DistillConfig) -> list[dict]:
    """Write task: ``targets/<unit>.parquet`` then the unit's status rows."""
    [record] = records
    unit = record["unit"]
    ids, targets = record.get("ids", []), record.get("targets")
    if "failure" in record:  # a faces part, or the model, failed: the unit's rows say so
        status, error = record["failure"]
        ids, targets = [], None
        statuses = [{"item_id": i["item_id"], "source": redact(i["source"]), "status": status, "error": error,
                     "n_frames": 0} for i in unit["items"]]
    elif "skipped" in record:
        skipped = record["skipped"]
        error = f"{len(skipped)} undecodable crops skipped: {'; '.join(skipped[:5])}" if skipped else None
        statuses = [{"item_id": unit["unit_id"], "source": redact(unit["items"][0]["source"]), "status": "ok",
                     "error": error, "n_frames": len(ids)}]
    else:
        statuses = record["statuses"]
    matrix = targets if targets is not None else np.zeros((0, DISTILL_DIM), np.float32)
    table = pa.table({"crop_id": pa.array(ids, pa.string()),
                      "target": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()),
                                                                  DISTILL_DIM)},
                     schema=TARGETS_SCHEMA)
    commit(cfg.output, unit, {"targets": (table, "crop_id")}, statuses, id_column="item_id",
           storage_options=cfg.storage_options, policy=cfg.retry)
    return statuses


def run(cfg: DistillConfig) -> dict[str, int]:
    """Run on the current Ray cluster (a local one if none); returns the count of each status
    among the inputs processed now."""
    work = with_retries(lambda: plan_units(cfg), cfg.retry, cfg.input)
    print(f"distill: {work.n_complete} units already complete, {len(work.units)} to do "
          f"({sum(len(u['items']) for u in work.units)} inputs)", flush=True)
    if not work.units:
        return {}
    connect(cfg)
    return summarise("distill", run_stages(work.units, cfg, load=load_unit, model=TeacherPair, write=write_unit,
                                           id_column="item_id", records_per_call=cfg.records_per_call),
                     sum(len(u["items"]) for u in work.units), cfg.output)
