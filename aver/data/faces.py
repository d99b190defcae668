"""Ray Datasets of face crops for training: AffectNet images with labels, FEC triplets, unlabeled
crops. Cropping runs as Ray Data CPU tasks; unreadable images are dropped and counted."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aver.constants import CROP_SIZE, DISTILL_DIM
from aver.data.manifests import Manifest, read_affectnet, read_fec
from aver.faces import crop_face
from aver.faults import RetryPolicy, guarded_map, verdict
from aver.io.media import IMAGE_EXTENSIONS, decode_faces, items_in_listing, list_inputs, load_image
from aver.io.parts import find_parts, join, list_names, read_part, read_slices
from aver.io.storage import find_files, redact, url_to_fs

log = logging.getLogger("aver")


class DroppedImages:
    """Ray actor (no CPUs) of a training run: the images each source's read tasks could not read
    (after retries) and dropped from their batches, counted once per image however often it is
    read again. The train loop reports the counts with each epoch's metrics."""

    def __init__(self) -> None:
        self.images: dict[str, set[str]] = {}

    def add(self, source: str, images: list[str]) -> None:
        self.images.setdefault(source, set()).update(images)

    def counts(self) -> dict[str, int]:
        return {source: len(images) for source, images in self.images.items()}


@dataclass
class Reading:
    """How the training datasets read their images: the same for every face source."""

    margin: float = 0.2
    """Context around a face box, as a fraction of its larger side (as extract_faces crops)."""
    storage_options: dict | None = None
    """fsspec options of the images' storage."""
    io_threads: int = 16
    """Image reads in flight per read task (an S3 GET waits 20-50 ms: one at a time, the GPU would wait)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How a transient storage fault is retried before the image counts as dropped."""
    dropped: Any = None
    """The run's :class:`DroppedImages` actor (None: dropped images are only logged)."""


def _crop(face: dict, reading: Reading) -> np.ndarray:
    image = load_image(face["source"], storage_options=reading.storage_options)
    box = face.get("box")
    if face.get("box_frac") is not None:
        h, w = image.shape[:2]
        f = face["box_frac"]
        box = (f[0] * w, f[1] * h, f[2] * w, f[3] * h)
    if box is None:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR))
    return crop_face(image, tuple(box), size=CROP_SIZE, margin=reading.margin)


def read_crops(faces: list[dict], what: str, reading: Reading) -> list[np.ndarray | None]:
    """The 140x140 crop of every face (``source``, and ``box`` in pixels or ``box_frac`` of the
    image, or neither: the whole image resized), ``reading.io_threads`` reads in flight, each
    retried; None for an image that could not be read, which is logged and counted under ``what``."""
    results = guarded_map(lambda face: _crop(face, reading), faces, reading.io_threads, reading.retry,
                          lambda face: face["source"])
    failed = []
    for face, (_, failure) in zip(faces, results):
        if failure:
            failed.append(redact(face["source"]))
            log.warning("%s: dropped %s: %s", what, failed[-1], failure[1])
    if failed and reading.dropped is not None:
        reading.dropped.add.remote(what, failed)
    return [crop for crop, _ in results]


def with_images(m: Manifest, sources, what: str, hint: str, storage_options=None) -> list[dict]:
    """The records of ``m`` whose images (``sources(record)``) exist under ``m.images_root``, from
    one listing of that folder. Says how many rows were used, rejected and left without an image;
    none usable is an error that says what is missing and what to run."""
    fs, root = url_to_fs(m.images_root, storage_options)
    fs.invalidate_cache()
    found = {p[len(root.rstrip("/")) + 1:] for p in find_files(fs, root)} if fs.isdir(root) else set()
    prefix = m.images_root.rstrip("/") + "/"
    kept = [r for r in m.records if all(not s.startswith(prefix) or s[len(prefix):] in found for s in sources(r))]
    total = len(m.records) + len(m.rejected)
    print(f"{what}: {len(kept)} of {total} rows used; {len(m.rejected)} rejected (malformed or unused "
          f"labels), {len(m.records) - len(kept)} without their images under {redact(m.images_root)}", flush=True)
    if not kept:
        raise ValueError(f"0 of {len(m.records)} {what} rows have their images under {redact(m.images_root)}"
                         f"{': ' + hint if hint and m.records else ''}")
    return kept


def _affectnet_batch(batch: dict, reading: Reading) -> dict:
    crops = read_crops([{"source": s, "box": b} for s, b in zip(batch["source"], batch["box"])], "affectnet", reading)
    keep = np.array([c is not None for c in crops], bool)
    return {"crop_id": np.asarray(batch["crop_id"])[keep], "image": _stack([c for c in crops if c is not None]),
            "label": np.asarray(batch["label"], np.int64)[keep], **_kept_targets(batch, keep)}


def _stack(crops: list[np.ndarray]) -> np.ndarray:
    return np.stack(crops) if crops else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)


def _kept_targets(batch: dict, keep: np.ndarray) -> dict:
    return {k: np.asarray(batch[k])[keep] for k in ("target", "has_target") if k in batch}


def distill_targets(uri: str, wanted: set[str], storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """The 80-d targets in distill's output ``uri`` (its ``targets/`` parts) of the crop ids in
    ``wanted``, read part by part, keeping only those: the driver joins them to the manifest rows,
    so each training worker receives the targets of its own rows with them, never a whole table."""
    folder = join(uri, "targets")
    names = sorted(list_names(folder, storage_options))
    if not names:
        raise FileNotFoundError(f"no distillation targets under {redact(folder)}: run jobs/distill.py first")
    keys = pa.array(sorted(wanted), pa.string())
    found: dict[str, np.ndarray] = {}
    for name in names:
        table = read_part(join(folder, f"{name}.parquet"), storage_options)
        table = table.filter(pc.is_in(table["crop_id"], keys))
        if table.num_rows:
            found.update(zip(table["crop_id"].to_pylist(), _target_matrix(table)))
    return found


def _target_matrix(table: pa.Table) -> np.ndarray:
    """``[n,80]`` float32: a targets table's ``target`` column."""
    return table["target"].combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, DISTILL_DIM)


def _target(targets: dict[str, np.ndarray], crop_id: str) -> dict:
    """The ``target`` (80 floats, zeros when the crop has none) and ``has_target`` columns of a row."""
    t = targets.get(crop_id)
    return {"target": np.zeros(DISTILL_DIM, np.float32) if t is None else t, "has_target": t is not None}


def _with_targets(rows: list[dict], targets: str | None, storage_options) -> list[dict]:
    """``rows`` (one crop each) with their crops' targets from the distill output ``targets``, if given."""
    if not targets:
        return rows
    found = distill_targets(targets, {r["crop_id"] for r in rows}, storage_options)
    return [{**r, **_target(found, r["crop_id"])} for r in rows]


def _read(rows: list[dict], shuffled: bool, fn, batch_size: int, reading: Reading, num_cpus: float = 1.0):
    """A dataset of manifest rows (sources, boxes: small) read by ``fn`` in tasks of ``batch_size``
    rows (``num_cpus`` each); the rows' blocks come in a fresh random order every time it is read
    when ``shuffled`` (training passes). A block holds at least a batch: Ray Data bundles small
    blocks into a call up to the batch, but leaves partial calls where the bundles end."""
    import math

    import ray.data

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(200, math.ceil(len(rows) / batch_size))))
    ds = ds.randomize_block_order() if shuffled else ds
    return ds.map_batches(fn, fn_kwargs={"reading": reading}, batch_size=batch_size, num_cpus=num_cpus)


def affectnet_dataset(csv_uri: str, images_root: str | None = None, *, reading: Reading | None = None,
                      shuffled: bool = False, targets: str | None = None, num_cpus: float = 1.0):
    """Rows ``crop_id``, ``image`` (140x140x3 uint8), ``label`` (0-7); returns (dataset, rejected rows).
    ``reading``: how images are read (storage, reads in flight, retries, the drop counter).
    ``shuffled``: the rows' blocks in a fresh order every pass (see :func:`_read`). ``targets``: a
    distill output whose targets join the rows (``target``, ``has_target``). ``num_cpus``: per
    read-and-crop task."""
    reading = reading or Reading()
    so = reading.storage_options
    m = read_affectnet(csv_uri, images_root, so)
    records = with_images(m, lambda r: [r["source"]], f"AffectNet {redact(csv_uri)}",
                          "is images_root (--affectnet-images) the folder of Manually_Annotated_Images?", so)
    rows = [{"crop_id": r["crop_id"], "source": r["source"], "box": list(r["box"]), "label": r["label"]}
            for r in records]
    return _read(_with_targets(rows, targets, so), shuffled, _affectnet_batch, 64, reading, num_cpus), m.rejected


def _fec_batch(batch: dict, reading: Reading) -> dict:
    out = {"i": [], "j": [], "k": [], "type": [], "i_id": [], "j_id": [], "k_id": []}
    with_targets = "targets" in batch
    if with_targets:
        out.update({f"{key}_{x}": [] for key in ("target", "has_target") for x in "ijk"})
    # every image of the batch's triplets read together; a triplet with an unreadable image is dropped
    faces = [{"source": f["source"], "box_frac": f["box_frac"]} for row in batch["faces"] for f in row]
    crops = iter(read_crops(faces, "fec", reading))
    rows = zip(batch["faces"], batch["pair"], batch["odd"], batch["type"])
    for row, (faces, pair, odd, kind) in enumerate(rows):
        mine = [next(crops) for _ in faces]
        if any(c is None for c in mine):
            continue
        out["i"].append(mine[int(pair[0])])
        out["j"].append(mine[int(pair[1])])
        out["k"].append(mine[int(odd)])
        out["type"].append(int(kind))
        for x, index in (("i", pair[0]), ("j", pair[1]), ("k", odd)):
            out[f"{x}_id"].append(faces[int(index)]["crop_id"])
            if with_targets:
                out[f"target_{x}"].append(batch["targets"][row][int(index)])
                out[f"has_target_{x}"].append(bool(batch["has_targets"][row][int(index)]))
    done = {**{k: _stack(out[k]) for k in ("i", "j", "k")}, "type": np.asarray(out["type"], np.int64),
            **{k: np.asarray(out[k], dtype=object) for k in ("i_id", "j_id", "k_id")}}
    if with_targets:
        dim = DISTILL_DIM
        done.update({f"target_{x}": np.asarray(out[f"target_{x}"], np.float32).reshape(-1, dim) for x in "ijk"})
        done.update({f"has_target_{x}": np.asarray(out[f"has_target_{x}"], bool) for x in "ijk"})
    return done


def fec_dataset(csv_uri: str, images_root: str | None = None, *, reading: Reading | None = None,
                shuffled: bool = False, targets: str | None = None, num_cpus: float = 1.0):
    """Rows ``i``, ``j`` (the annotated most-similar pair), ``k`` (the odd one) as 140x140x3 uint8
    crops, their crop ids ``i_id``/``j_id``/``k_id`` and ``type`` (0/1/2 = one/two/three-class);
    triplets with a missing image are dropped; ``reading`` and ``shuffled`` as in
    :func:`affectnet_dataset`; ``targets`` joins each image's (``target_i``/``_j``/``_k``,
    ``has_target_i``/``_j``/``_k``); ``num_cpus`` per read-and-crop task."""
    reading = reading or Reading()
    so = reading.storage_options
    m = read_fec(csv_uri, images_root, so)
    records = with_images(m, lambda r: [f["source"] for f in r["faces"]], f"FEC triplets {redact(csv_uri)}",
                          "run jobs/fetch_fec.py on this CSV first", so)
    rows = [{"faces": [{"source": f["source"], "box_frac": list(f["box_frac"]), "crop_id": f["crop_id"]}
                       for f in r["faces"]],
             "pair": list(r["pair"]), "odd": r["odd"], "type": r["type"]} for r in records]
    if targets:
        found = distill_targets(targets, {f["crop_id"] for r in rows for f in r["faces"]}, so)
        for r in rows:
            joined = [_target(found, f["crop_id"]) for f in r["faces"]]
            r["targets"] = np.stack([t["target"] for t in joined])
            r["has_targets"] = np.array([t["has_target"] for t in joined])
    return _read(rows, shuffled, _fec_batch, 32, reading, num_cpus), m.rejected


def _image_batch(batch: dict, reading: Reading) -> dict:
    crops = read_crops([{"source": s} for s in batch["source"]], "unlabeled", reading)
    keep = np.array([c is not None for c in crops], bool)
    return {"crop_id": np.asarray(batch["crop_id"], dtype=object)[keep],
            "image": _stack([c for c in crops if c is not None]), **_kept_targets(batch, keep)}


def unlabeled_dataset(uri: str, *, reading: Reading | None = None, shuffled: bool = False,
                      targets: str | None = None):
    """Rows ``crop_id`` (as distill names it) and ``image`` (140x140x3 uint8) of the crops in ``uri``:
    extract_faces' output (its ``faces/`` parts, read packed: see :func:`_packed_unlabeled`), or a
    folder, glob or manifest of images (one read each, resized to 140); ``reading``, ``shuffled``
    and ``targets`` as in :func:`affectnet_dataset`."""
    reading = reading or Reading()
    so = reading.storage_options
    parts, files = find_parts(uri, so)
    if parts:
        return _packed_unlabeled(uri, parts, reading, shuffled, targets)
    listed = items_in_listing(uri, files, IMAGE_EXTENSIONS) if files is not None else list_inputs(uri, so, IMAGE_EXTENSIONS)
    items = [i for i in listed if i.kind == "image"]
    if not items:
        raise ValueError(f"no images and no faces parts under {redact(uri)}")
    rows = [{"crop_id": i.item_id, "source": i.source} for i in items]
    return _read(_with_targets(rows, targets, so), shuffled, _image_batch, 64, reading)


PACKED_ROWS = 256
"""Crops a packed read task decodes (and hands on) at a time."""


def _packed_unlabeled(uri: str, parts: list[tuple[str, str]], reading: Reading, shuffled: bool, targets: str | None):
    """The crops of extract_faces' faces parts: a task per part reads it slice by slice (one GET
    opens hundreds of crops) and joins the targets of distill's part of the same name, streamed
    beside it in the same order; the driver holds part names only, never a crop id. With
    ``targets``, a part that distill has not done is left out (its crops could only learn RKD)."""
    so = reading.storage_options
    rows = [{"name": name, "part": part, "targets": ""} for name, part in parts]
    if targets:
        folder = join(targets, "targets")
        done = list_names(folder, so)
        rows = [{**r, "targets": join(folder, f"{r['name']}.parquet")} for r in rows if r["name"] in done]
        if not rows:
            raise FileNotFoundError(f"none of the {len(parts)} faces parts under {redact(uri)} has distillation "
                                    f"targets under {redact(folder)}: run jobs/distill.py on {redact(uri)} first")
    left = f"; {len(parts) - len(rows)} without targets left out" if len(rows) < len(parts) else ""
    print(f"unlabeled {redact(uri)}: {len(rows)} faces parts, read packed{left}", flush=True)
    return _read(rows, shuffled, _packed_batches, 1, reading)


def _packed_batches(batch: dict, reading: Reading):
    for name, part, targets in zip(batch["name"], batch["part"], batch["targets"]):
        try:
            yield from _part_crops(part, targets or None, reading)
        except Exception as e:  # noqa: BLE001 - one unreadable part costs its own crops only
            log.warning("unlabeled: dropped the rest of %s: %s", redact(part), verdict(e, part)[1])
            if reading.dropped is not None:
                reading.dropped.add.remote("unlabeled", [f"{redact(part)} (part)"])


def _part_crops(part: str, targets: str | None, reading: Reading):
    """Batches of a faces part's crops (undecodable ones dropped and counted), with their targets
    when ``targets`` names distill's part of them."""
    so = reading.storage_options
    joined = _TargetStream(targets, so, reading) if targets else None
    for table in read_slices(part, ["crop_id", "crop"], PACKED_ROWS, so, reading.retry):
        ids, images, keep, bad = decode_faces(table)
        failed = [f"{redact(part)}:{crop_id}" for crop_id, _ in bad]
        for name, (_, why) in zip(failed, bad):
            log.warning("unlabeled: dropped %s: %s", name, why)
        if failed and reading.dropped is not None:
            reading.dropped.add.remote("unlabeled", failed)
        out = {"crop_id": np.asarray(ids, dtype=object)[keep], "image": images}
        if joined is not None:  # every crop passes the stream (a dropped one's target too)
            target, has = joined.take(ids)
            out["target"], out["has_target"] = target[keep], has[keep]
        if keep.any():
            yield out
    if joined is not None:
        joined.close(part)


class _TargetStream:
    """distill's targets of one faces part, read beside it: distill writes a part's targets in the
    part's order (undecodable crops left out), so each crop's target is the next unread one or
    none; a slice at a time is held, never the part's."""

    def __init__(self, uri: str, storage_options, reading: Reading) -> None:
        self.uri = uri
        self.slices = read_slices(uri, ["crop_id", "target"], PACKED_ROWS, storage_options, reading.retry)
        self.ids: list[str] = []
        self.values = np.zeros((0, DISTILL_DIM), np.float32)
        self.at = 0

    def _next(self) -> bool:
        table = next(self.slices, None)
        if table is None:
            return False
        self.ids = table["crop_id"].to_pylist()
        self.values = _target_matrix(table)
        self.at = 0
        return True

    def _peek(self) -> str | None:
        while self.at >= len(self.ids):
            if not self._next():
                return None
        return self.ids[self.at]

    def take(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``[n,80]`` targets of ``ids`` (zeros where none) and whether each has one."""
        target = np.zeros((len(ids), DISTILL_DIM), np.float32)
        has = np.zeros(len(ids), bool)
        for i, crop_id in enumerate(ids):
            if self._peek() == crop_id:
                target[i], has[i] = self.values[self.at], True
                self.at += 1
        return target, has

    def close(self, part: str) -> None:
        """Warns when targets are left: they did not line up with the part's crops (a part that
        changed after distill ran), whose crops went without them."""
        left = 0
        while self._peek() is not None:
            left += len(self.ids) - self.at
            self.at = len(self.ids)
        if left:
            log.warning("unlabeled: %d targets in %s not in the order of %s's crops: rerun jobs/distill.py on it",
                        left, redact(self.uri), redact(part))
