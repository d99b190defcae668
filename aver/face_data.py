"""Ray Datasets of face crops for training: AffectNet images with labels, FEC triplets, unlabeled
crops. Cropping runs as Ray Data CPU tasks; unreadable images are dropped and counted."""

from __future__ import annotations

import numpy as np

from aver.datasets import read_affectnet, read_fec
from aver.faces import crop_face
from aver.media import MediaError, load_image

CROP = 140


def _crop(source: str, box=None, box_frac=None, margin: float = 0.2, storage_options=None) -> np.ndarray | None:
    try:
        image = load_image(source, storage_options=storage_options)
    except MediaError:
        return None
    if box_frac is not None:
        h, w = image.shape[:2]
        box = (box_frac[0] * w, box_frac[1] * h, box_frac[2] * w, box_frac[3] * h)
    if box is None:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((CROP, CROP), Image.BILINEAR))
    return crop_face(image, box, size=CROP, margin=margin)


def _affectnet_batch(batch: dict, margin: float, storage_options) -> dict:
    images, keep = [], []
    for source, box in zip(batch["source"], batch["box"]):
        crop = _crop(source, box=tuple(box), margin=margin, storage_options=storage_options)
        keep.append(crop is not None)
        images.append(crop if crop is not None else np.zeros((CROP, CROP, 3), np.uint8))
    keep = np.array(keep, bool)
    return {"crop_id": np.asarray(batch["crop_id"])[keep], "image": np.stack(images)[keep],
            "label": np.asarray(batch["label"], np.int64)[keep]}


def affectnet_dataset(csv_uri: str, images_root: str | None = None, *, margin: float = 0.2,
                      storage_options: dict | None = None):
    """Rows ``crop_id``, ``image`` (140x140x3 uint8), ``label`` (0-7); returns (dataset, rejected rows)."""
    import ray.data

    m = read_affectnet(csv_uri, images_root, storage_options)
    if not m.records:
        raise ValueError(f"no usable rows in {csv_uri} ({len(m.rejected)} rejected)")
    rows = [{"crop_id": r["crop_id"], "source": r["source"], "box": list(r["box"]), "label": r["label"]}
            for r in m.records]
    ds = ray.data.from_items(rows).map_batches(
        _affectnet_batch, fn_kwargs={"margin": margin, "storage_options": storage_options}, batch_size=64)
    return ds, m.rejected


def _fec_batch(batch: dict, margin: float, storage_options) -> dict:
    out = {"i": [], "j": [], "k": [], "type": []}
    for faces, pair, odd, kind in zip(batch["faces"], batch["pair"], batch["odd"], batch["type"]):
        crops = [_crop(f["source"], box_frac=tuple(f["box_frac"]), margin=margin, storage_options=storage_options)
                 for f in faces]
        if any(c is None for c in crops):
            continue
        out["i"].append(crops[int(pair[0])])
        out["j"].append(crops[int(pair[1])])
        out["k"].append(crops[int(odd)])
        out["type"].append(int(kind))
    empty = np.zeros((0, CROP, CROP, 3), np.uint8)
    return {"i": np.stack(out["i"]) if out["i"] else empty, "j": np.stack(out["j"]) if out["j"] else empty,
            "k": np.stack(out["k"]) if out["k"] else empty, "type": np.asarray(out["type"], np.int64)}


def fec_dataset(csv_uri: str, images_root: str | None = None, *, margin: float = 0.2,
                storage_options: dict | None = None):
    """Rows ``i``, ``j`` (the annotated most-similar pair), ``k`` (the odd one) as 140x140x3 uint8
    crops and ``type`` (0/1/2 = one/two/three-class); triplets with a missing image are dropped."""
    import ray.data

    m = read_fec(csv_uri, images_root, storage_options)
    if not m.records:
        raise ValueError(f"no usable triplets in {csv_uri} ({len(m.rejected)} rejected)")
    rows = [{"faces": [{"source": f["source"], "box_frac": list(f["box_frac"])} for f in r["faces"]],
             "pair": list(r["pair"]), "odd": r["odd"], "type": r["type"]} for r in m.records]
    ds = ray.data.from_items(rows).map_batches(
        _fec_batch, fn_kwargs={"margin": margin, "storage_options": storage_options}, batch_size=32)
    return ds, m.rejected


def to_teacher_input(images) -> "torch.Tensor":  # noqa: F821
    """uint8 ``[B,140,140,3]`` -> float ``[B,3,140,140]`` with facenet standardisation, channels_last."""
    import torch

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    return ((x - 127.5) / 128.0).contiguous(memory_format=torch.channels_last)
