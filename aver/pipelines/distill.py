"""distill: face crops -> two teachers -> 80-d distillation targets (paper §3.1.2).

The target of a crop is ``[t1.fec, t1.affectnet, t2.fec, t2.affectnet]`` with each part
L2-normalised. Inputs are ``faces/`` parts from extract_faces (one output part per input part)
or image folders (chunks of images); outputs are ``targets/<unit>.parquet`` and then
``status/<unit>.parquet``, both atomic, so reruns skip finished units and never duplicate rows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

from aver.constants import CROP_SIZE, DISTILL_DIM
from aver.data.manifests import is_affectnet_csv, is_fec_csv, read_affectnet, read_fec
from aver.faces import crop_face
from aver.faults import guarded_map, with_retries
from aver.io.media import IMAGE_EXTENSIONS, InputItem, decode_faces, items_in_listing, list_inputs, load_image, resize_crops
from aver.io.parts import find_parts, read_slices
from aver.io.storage import absolute, redact, split_credentials
from aver.pipelines.cluster import actor_setup, connect
from aver.pipelines.ledger import Plan, Unit, commit, plan, status_row
from aver.pipelines.stages import ActorPoolConfig, ModelStage, Record, Records, run_stages, summarise

if TYPE_CHECKING:  # torch and the models load in the model actors only, not in the CPU tasks
    import torch
TARGETS_SCHEMA = pa.schema([("crop_id", pa.string()), ("target", pa.list_(pa.float32(), DISTILL_DIM))])


@dataclass
class DistillConfig(ActorPoolConfig):
    uri_fields = ("output",)

    input: tuple[str, ...]
    """One or more sources, each a faces/ folder of extract_faces (or its parent), an AffectNet
    training.csv / validation.csv, a Google FEC CSV (images fetched beside it), or a
    folder/glob/manifest of face images; their units run together, into one output."""
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
    """Crops handled (and written) together when the input is images or a manifest; a faces part
    is read (and its crops held) this many at a time."""
    images_root: str | None = None
    """Image folder of an AffectNet CSV (default: Manually_Annotated_Images/ beside the CSV, else
    beside the CSV's folder) or of fetched FEC images (default: images/ beside the CSV); with one
    input only."""
    margin: float = 0.2
    """Context around manifest face boxes, as for extract_faces crops."""
    precision: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32")})
    """'bf16' autocast, 'fp32', or 'auto' (bf16 on CUDA, fp32 on CPU)."""

    def storage_uris(self) -> list[tuple[str, str]]:
        return super().storage_uris() + [("input", i) for i in self.input] + [("teachers", t) for t in self.teachers]

    def __post_init__(self) -> None:
        self.input = (self.input,) if isinstance(self.input, str) else tuple(self.input)
        if not self.input:
            raise ValueError("distill needs at least one input")
        if self.images_root and len(self.input) > 1:
            raise ValueError(f"--images-root names the images of one input, and {len(self.input)} were given: "
                             "distill them one at a time, or leave the images where the datasets put them")
        inputs = []
        for uri in self.input:
            uri, self.storage_options = split_credentials(uri, self.storage_options)
            inputs.append(absolute(uri))
        self.input = tuple(inputs)
        self.images_root = absolute(self.images_root)
        super().__post_init__()
        self.teachers = tuple(absolute(t) for t in self.teachers)
        if len(self.teachers) != 2:
            raise ValueError(f"distill needs exactly two teacher checkpoints, got {len(self.teachers)}")
        if self.batch_size < 1 or self.images_per_unit < 1:
            raise ValueError("batch_size >= 1 and images_per_unit >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


def teacher_targets(out1, out2) -> torch.Tensor:
    """``[B,80]``: the four teacher outputs, each L2-normalised, concatenated."""
    import torch

    parts = [out1.fec, out1.affectnet, out2.fec, out2.affectnet]
    return torch.cat([torch.nn.functional.normalize(p.float(), dim=1) for p in parts], dim=1)


def _crop_entries(cfg: DistillConfig, source: str, listing: list[InputItem] | None) -> tuple[str, list[dict], int]:
    """What to crop for a non-faces/ input: (prefix, entries, rejected manifest rows)."""
    so = cfg.storage_options
    if is_affectnet_csv(source, so):
        m = read_affectnet(source, cfg.images_root, so)
        return "affectnet", [{"item_id": r["crop_id"], "source": r["source"], "box": r["box"]} for r in m.records], \
            len(m.rejected)
    if is_fec_csv(source, so):
        m = read_fec(source, cfg.images_root, so)
        unique = {f["crop_id"]: f for r in m.records for f in r["faces"]}
        return "fec", [{"item_id": f["crop_id"], "source": f["source"], "box_frac": f["box_frac"]}
                       for f in sorted(unique.values(), key=lambda f: f["crop_id"])], len(m.rejected)
    images = [i for i in (listing if listing is not None else list_inputs(source, so, IMAGE_EXTENSIONS))
              if i.kind == "image"]
    return "images", [{"item_id": i.item_id, "source": i.source, "refusal": i.refusal} for i in images], 0


def _faces_parts(source: str, cfg: DistillConfig) -> tuple[list[tuple[str, dict]], list[InputItem] | None]:
    """A folder input's faces/ parts as single units, if it has any; else the images in it (one
    recursive listing either way). Not a folder: no parts, no listing."""
    parts, files = find_parts(source, cfg.storage_options)
    if parts or files is None:
        return [(name, {"item_id": name, "source": uri, "kind": "faces"}) for name, uri in parts], None
    return [], items_in_listing(source, files, IMAGE_EXTENSIONS)


def plan_units(cfg: DistillConfig) -> Plan:
    """One unit per faces/ part, or chunks of pending crops (AffectNet / FEC manifests, image
    folders), over every input; unit ids never depend on positions (see :mod:`aver.pipelines.ledger`)."""
    singles: dict[str, dict] = {}
    chunked: dict[str, dict[str, dict]] = {}  # prefix -> item id -> entry (an image listed twice is one item)
    for source in cfg.input:
        parts, listing = _faces_parts(source, cfg)
        singles.update(parts)
        if parts:
            continue
        prefix, entries, rejected = _crop_entries(cfg, source, listing)
        if rejected:
            print(f"distill: {rejected} rows of {redact(source)} rejected (malformed or unused labels)", flush=True)
        chunked.setdefault(prefix, {}).update((e["item_id"], e) for e in entries)
    return plan(cfg.output, cfg.storage_options, singles=list(singles.items()),
                chunked={prefix: list(entries.items()) for prefix, entries in sorted(chunked.items())},
                per_unit=cfg.images_per_unit, id_column="item_id", output_folders=("targets",))


@dataclass(kw_only=True)
class TargetsRecord(Record):
    """distill's record: a chunk of crops, or a slice of a faces part, and then their targets."""

    ids: list[str] = field(default_factory=list)
    """Crop ids of the images, in order."""
    images: np.ndarray | None = None
    """``[n,140,140,3]`` uint8 crops (model input)."""
    targets: np.ndarray | None = None
    """``[n,80]`` targets, once computed."""
    statuses: list[dict] = field(default_factory=list)
    """A chunk's status rows, one per item."""
    skipped: list[str] | None = None
    """A faces part's slice: its undecodable crops, ``"<crop_id>: <why>"``."""


def load_unit(unit: Unit, cfg: DistillConfig) -> TargetsRecord | Iterator[TargetsRecord]:
    """Load stage (CPU task): a unit's crops as ``[n,140,140,3]`` arrays with their ids. A faces part
    is read in slices of ``images_per_unit`` crops, a record each (undecodable crops skipped and
    counted); a chunk of images reads ``io_threads`` at a time, each read, retried and judged on its
    own (its status row)."""
    so = cfg.storage_options
    if unit.items[0].get("kind") == "faces":
        return _part_slices(unit, cfg)

    def load(entry: dict) -> np.ndarray:
        InputItem(entry["source"], entry["item_id"], "image", entry.get("refusal")).check()
        image = load_image(entry["source"], storage_options=so)
        box, frac = entry.get("box"), entry.get("box_frac")
        if frac is not None:
            h, w = image.shape[:2]
            box = (frac[0] * w, frac[1] * h, frac[2] * w, frac[3] * h)
        return crop_face(image, box, size=CROP_SIZE, margin=cfg.margin) if box is not None else image

    loaded = guarded_map(load, unit.items, cfg.io_threads, cfg.retry, lambda e: e["source"])
    ids, images, statuses = [], [], []
    for entry, (image, failure) in zip(unit.items, loaded):
        source = redact(entry["source"])
        if failure:
            statuses.append(status_row("item_id", entry["item_id"], source, *failure))
        else:
            images.append(image)
            ids.append(entry["item_id"])
            statuses.append(status_row("item_id", entry["item_id"], source, n_frames=1))
    return TargetsRecord(unit=unit, ids=ids, images=resize_crops(images), statuses=statuses)


def _part_slices(unit: Unit, cfg: DistillConfig) -> Iterator[TargetsRecord]:
    item = unit.items[0]
    # a storage fault re-opens the part where it stopped; one past the retries ends the unit as failed
    slices = read_slices(item["source"], ["crop_id", "crop"], cfg.images_per_unit, cfg.storage_options, cfg.retry)
    for table in _at_least_one(slices):
        ids, images, decoded, failed = decode_faces(table)
        del table
        yield TargetsRecord(unit=unit, ids=[i for i, ok in zip(ids, decoded) if ok], images=images,
                            skipped=[f"{crop_id}: {why}" for crop_id, why in failed])


def _at_least_one(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """``tables``, or one empty table when there are none (a part of no crops is a unit of no targets)."""
    empty = True
    for table in tables:
        empty = False
        yield table
    if empty:
        yield pa.table({"crop_id": pa.array([], pa.string()), "crop": pa.array([], pa.binary())})


class TeacherPair(ModelStage):
    """Model stage (Ray Data actor): both teachers on one device; the crops of several units go
    through them in batches of ``batch_size``."""

    def __init__(self, cfg: DistillConfig) -> None:
        import torch

        from aver.models import Teacher, autocast, load_checkpoint, same_weights

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

    def targets(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = self.teachers[0].preprocess(images, self.device)
        with torch.inference_mode(), self.autocast:
            if self.shared_trunk:
                trunk = self.teachers[0].trunk(x)
                out = [t(trunk, after="trunk") for t in self.teachers]
            else:
                out = [t(x) for t in self.teachers]
        return teacher_targets(*out).cpu().numpy()

    def run(self, records: list[TargetsRecord]) -> None:
        images = np.concatenate([r.images for r in records])
        size = self.cfg.batch_size
        out = [self.targets(images[s:s + size]) for s in range(0, len(images), size)]
        targets = np.concatenate(out) if out else np.zeros((0, DISTILL_DIM), np.float32)
        start = 0
        for r in records:
            r.targets = targets[start:start + len(r.ids)]
            start += len(r.ids)


def _targets_table(ids: list[str], targets: np.ndarray | None) -> pa.Table:
    matrix = targets if targets is not None else np.zeros((0, DISTILL_DIM), np.float32)
    return pa.table({"crop_id": pa.array(ids, pa.string()),
                     "target": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()),
                                                                 DISTILL_DIM)}, schema=TARGETS_SCHEMA)


def write_unit(unit: Unit, records: Records, cfg: DistillConfig) -> list[dict]:
    """Commit: ``targets/<unit>.parquet`` (a faces part's slices one after the other) then the
    unit's status rows."""
    n, n_skipped, skipped = 0, 0, []
    for r in records():
        if r.failure:  # a faces part, or the model, failed: the unit's rows say so
            statuses = [status_row("item_id", i["item_id"], redact(i["source"]), *r.failure) for i in unit.items]
            return _commit(cfg, unit, _targets_table([], None), statuses)
        if r.skipped is None:  # a chunk of crops: one record
            return _commit(cfg, unit, _targets_table(r.ids, r.targets), r.statuses)
        n, n_skipped = n + len(r.ids), n_skipped + len(r.skipped)
        skipped += r.skipped[:5 - len(skipped)]
    error = f"{n_skipped} undecodable crops skipped: {'; '.join(skipped)}" if n_skipped else None
    status = status_row("item_id", unit.unit_id, redact(unit.items[0]["source"]), error=error, n_frames=n)
    return _commit(cfg, unit, lambda: (_targets_table(r.ids, r.targets) for r in records()), [status])


def _commit(cfg: DistillConfig, unit: Unit, targets, statuses: list[dict]) -> list[dict]:
    commit(cfg.output, unit, {"targets": (targets, TARGETS_SCHEMA, "crop_id")}, statuses, id_column="item_id",
           storage_options=cfg.storage_options, policy=cfg.retry)
    return statuses


def run(cfg: DistillConfig) -> dict[str, int]:
    """Run on the current Ray cluster (a local one if none); returns the count of each status
    among the inputs processed now."""
    work = with_retries(lambda: plan_units(cfg), cfg.retry, " ".join(cfg.input))
    print(f"distill: {work.n_complete} units already complete, {len(work.units)} to do "
          f"({sum(len(u.items) for u in work.units)} inputs)", flush=True)
    if not work.units:
        return {}
    connect(cfg)
    return summarise("distill", run_stages(work.units, cfg, load=load_unit, model=TeacherPair, commit=write_unit,
                                           id_column="item_id", records_per_call=cfg.records_per_call),
                     sum(len(u.items) for u in work.units), cfg.output)
