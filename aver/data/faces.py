"""Ray Datasets of face crops for training: AffectNet images with labels, FEC triplets, unlabeled
crops. Cropping runs as Ray Data CPU tasks; unreadable images are dropped and counted."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from aver.constants import CROP_SIZE, DISTILL_DIM
from aver.data.manifests import Manifest, read_affectnet, read_fec
from aver.faces import crop_face
from aver.faults import MediaError
from aver.io.media import load_image
from aver.io.storage import redact, url_to_fs

log = logging.getLogger("aver")


def _crop(source: str, box=None, box_frac=None, margin: float = 0.2, storage_options=None) -> np.ndarray | None:
    try:
        image = load_image(source, storage_options=storage_options)
    except MediaError as e:
        log.warning("dropped %s: %s", redact(source), e)  # counted in the task's log, never silent
        return None
    if box_frac is not None:
        h, w = image.shape[:2]
        box = (box_frac[0] * w, box_frac[1] * h, box_frac[2] * w, box_frac[3] * h)
    if box is None:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR))
    return crop_face(image, box, size=CROP_SIZE, margin=margin)


def with_images(m: Manifest, sources, what: str, hint: str, storage_options=None) -> list[dict]:
    """The records of ``m`` whose images (``sources(record)``) exist under ``m.images_root``, from
    one listing of that folder. Says how many rows were used, rejected and left without an image;
    none usable is an error that says what is missing and what to run."""
    fs, root = url_to_fs(m.images_root, storage_options)
    fs.invalidate_cache()
    found = {p[len(root.rstrip("/")) + 1:] for p in fs.find(root)} if fs.isdir(root) else set()
    prefix = m.images_root.rstrip("/") + "/"
    kept = [r for r in m.records if all(not s.startswith(prefix) or s[len(prefix):] in found for s in sources(r))]
    total = len(m.records) + len(m.rejected)
    print(f"{what}: {len(kept)} of {total} rows used; {len(m.rejected)} rejected (malformed or unused "
          f"labels), {len(m.records) - len(kept)} without their images under {redact(m.images_root)}", flush=True)
    if not kept:
        raise ValueError(f"0 of {len(m.records)} {what} rows have their images under {redact(m.images_root)}"
                         f"{': ' + hint if hint and m.records else ''}")
    return kept


def _affectnet_batch(batch: dict, margin: float, storage_options) -> dict:
    images, keep = [], []
    for source, box in zip(batch["source"], batch["box"]):
        crop = _crop(source, box=tuple(box), margin=margin, storage_options=storage_options)
        keep.append(crop is not None)
        images.append(crop if crop is not None else np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8))
    keep = np.array(keep, bool)
    return {"crop_id": np.asarray(batch["crop_id"])[keep], "image": np.stack(images)[keep],
            "label": np.asarray(batch["label"], np.int64)[keep], **_kept_targets(batch, keep)}


def _kept_targets(batch: dict, keep: np.ndarray) -> dict:
    return {k: np.asarray(batch[k])[keep] for k in ("target", "has_target") if k in batch}


def distill_targets(uri: str, wanted: set[str], storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """The 80-d targets in distill's output ``uri`` (its ``targets/`` parts) of the crop ids in
    ``wanted``, read part by part, keeping only those: the driver joins them to the manifest rows,
    so each training worker receives the targets of its own rows with them, never a whole table."""
    import pyarrow.compute as pc

    from aver.io.parts import join, list_names, read_part

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
            values = table["target"].combine_chunks().flatten().to_numpy().astype(np.float32)
            found.update(zip(table["crop_id"].to_pylist(), values.reshape(table.num_rows, -1)))
    return found


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


def _rows(rows: list[dict], shuffled: bool):
    """A dataset of manifest rows (sources, boxes: small), whose blocks come in a fresh random
    order every time it is read when ``shuffled`` (training passes); images are read after this."""
    import ray.data

    ds = ray.data.from_items(rows)
    return ds.randomize_block_order() if shuffled else ds


def affectnet_dataset(csv_uri: str, images_root: str | None = None, *, margin: float = 0.2,
                      storage_options: dict | None = None, shuffled: bool = False, targets: str | None = None,
                      num_cpus: float = 1.0):
    """Rows ``crop_id``, ``image`` (140x140x3 uint8), ``label`` (0-7); returns (dataset, rejected rows).
    ``shuffled``: the rows' blocks in a fresh order every pass (see :func:`_rows`). ``targets``: a
    distill output whose targets join the rows (``target``, ``has_target``). ``num_cpus``: per
    read-and-crop task."""
    m = read_affectnet(csv_uri, images_root, storage_options)
    records = with_images(m, lambda r: [r["source"]], f"AffectNet {redact(csv_uri)}",
                          "is images_root (--affectnet-images) the folder of Manually_Annotated_Images?",
                          storage_options)
    rows = [{"crop_id": r["crop_id"], "source": r["source"], "box": list(r["box"]), "label": r["label"]}
            for r in records]
    ds = _rows(_with_targets(rows, targets, storage_options), shuffled).map_batches(
        _affectnet_batch, fn_kwargs={"margin": margin, "storage_options": storage_options}, batch_size=64,
        num_cpus=num_cpus)
    return ds, m.rejected


def _fec_batch(batch: dict, margin: float, storage_options) -> dict:
    out = {"i": [], "j": [], "k": [], "type": [], "i_id": [], "j_id": [], "k_id": []}
    with_targets = "targets" in batch
    if with_targets:
        out.update({f"{key}_{x}": [] for key in ("target", "has_target") for x in "ijk"})
    rows = zip(batch["faces"], batch["pair"], batch["odd"], batch["type"])
    for row, (faces, pair, odd, kind) in enumerate(rows):
        crops = [_crop(f["source"], box_frac=tuple(f["box_frac"]), margin=margin, storage_options=storage_options)
                 for f in faces]
        if any(c is None for c in crops):
            continue
        out["i"].append(crops[int(pair[0])])
        out["j"].append(crops[int(pair[1])])
        out["k"].append(crops[int(odd)])
        out["type"].append(int(kind))
        for x, index in (("i", pair[0]), ("j", pair[1]), ("k", odd)):
            out[f"{x}_id"].append(faces[int(index)]["crop_id"])
            if with_targets:
                out[f"target_{x}"].append(batch["targets"][row][int(index)])
                out[f"has_target_{x}"].append(bool(batch["has_targets"][row][int(index)]))
    empty = np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    done = {**{k: np.stack(out[k]) if out[k] else empty for k in ("i", "j", "k")},
            "type": np.asarray(out["type"], np.int64),
            **{k: np.asarray(out[k], dtype=object) for k in ("i_id", "j_id", "k_id")}}
    if with_targets:
        dim = DISTILL_DIM
        done.update({f"target_{x}": np.asarray(out[f"target_{x}"], np.float32).reshape(-1, dim) for x in "ijk"})
        done.update({f"has_target_{x}": np.asarray(out[f"has_target_{x}"], bool) for x in "ijk"})
    return done


def fec_dataset(csv_uri: str, images_root: str | None = None, *, margin: float = 0.2,
                storage_options: dict | None = None, shuffled: bool = False, targets: str | None = None,
                num_cpus: float = 1.0):
    """Rows ``i``, ``j`` (the annotated most-similar pair), ``k`` (the odd one) as 140x140x3 uint8
    crops, their crop ids ``i_id``/``j_id``/``k_id`` and ``type`` (0/1/2 = one/two/three-class);
    triplets with a missing image are dropped; ``shuffled`` as in :func:`affectnet_dataset`;
    ``targets`` joins each image's (``target_i``/``_j``/``_k``, ``has_target_i``/``_j``/``_k``);
    ``num_cpus`` per read-and-crop task."""
    m = read_fec(csv_uri, images_root, storage_options)
    records = with_images(m, lambda r: [f["source"] for f in r["faces"]], f"FEC triplets {redact(csv_uri)}",
                          "run jobs/fetch_fec.py on this CSV first", storage_options)
    rows = [{"faces": [{"source": f["source"], "box_frac": list(f["box_frac"]), "crop_id": f["crop_id"]}
                       for f in r["faces"]],
             "pair": list(r["pair"]), "odd": r["odd"], "type": r["type"]} for r in records]
    if targets:
        found = distill_targets(targets, {f["crop_id"] for r in rows for f in r["faces"]}, storage_options)
        for r in rows:
            joined = [_target(found, f["crop_id"]) for f in r["faces"]]
            r["targets"] = np.stack([t["target"] for t in joined])
            r["has_targets"] = np.array([t["has_target"] for t in joined])
    ds = _rows(rows, shuffled).map_batches(
        _fec_batch, fn_kwargs={"margin": margin, "storage_options": storage_options}, batch_size=32,
        num_cpus=num_cpus)
    return ds, m.rejected


def _image_batch(batch: dict, storage_options) -> dict:
    images, keep = [], []
    for source in batch["source"]:
        crop = _crop(source, storage_options=storage_options)
        keep.append(crop is not None)
        if crop is not None:
            images.append(crop)
    keep = np.array(keep, bool)
    return {"crop_id": np.asarray(batch["crop_id"], dtype=object)[keep],
            "image": np.stack(images) if images else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8),
            **_kept_targets(batch, keep)}


def unlabeled_dataset(uri: str, storage_options: dict | None = None, shuffled: bool = False,
                      targets: str | None = None):
    """Rows ``crop_id`` (the image's item id, as distill names it) and ``image`` (resized to 140);
    ``shuffled`` and ``targets`` as in :func:`affectnet_dataset`."""
    from aver.io.media import IMAGE_EXTENSIONS, list_inputs

    items = [i for i in list_inputs(uri, storage_options, IMAGE_EXTENSIONS) if i.kind == "image"]
    if not items:
        raise ValueError(f"no images under {uri}")
    rows = [{"crop_id": i.item_id, "source": i.source} for i in items]
    return _rows(_with_targets(rows, targets, storage_options), shuffled).map_batches(_image_batch, fn_kwargs={"storage_options": storage_options},
                                                 batch_size=64)
