"""Readers for the real datasets' manifests (SPEC §5, REFERENCES): AffectNet and Google FEC.

Each reader returns the usable records and the rejected rows with a reason, so a malformed
line is reported and skipped, never fatal and never silently dropped. Where a dataset's files are
when no flag names them is decided here, once, for every job (the datasets' own layouts):

- AffectNet: the release keeps its file lists and images in sibling folders
  (``Manually_Annotated_file_lists/training.csv`` beside ``Manually_Annotated_Images/``); the demo
  corpus keeps ``training.csv`` beside ``Manually_Annotated_Images/``. Either is found.
- FEC: the images ``fetch_fec`` fetched, in ``images/`` beside the CSV.
- RECOLA: the AVEC 2016 folders under one root (:func:`read_recola`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field

from aver.constants import FEC_TRIPLET_TYPES
from aver.io.storage import url_to_fs

AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")
FEC_TYPES = {name: code for code, name in enumerate(FEC_TRIPLET_TYPES)}
AFFECTNET_IMAGES = "Manually_Annotated_Images"
"""The release's image folder; ``subDirectory_filePath`` is relative to it."""
AFFECTNET_FILE_LISTS = "Manually_Annotated_file_lists"
"""The release's folder of training.csv and validation.csv."""


@dataclass
class Manifest:
    records: list[dict] = field(default_factory=list)
    """Usable rows, one dict each."""
    rejected: list[dict] = field(default_factory=list)
    """``{"line": n, "reason": ...}`` for each row that was skipped."""
    images_root: str = ""
    """The folder the records' image ``source`` URIs are under."""


def _read_text(uri: str, storage_options: dict | None) -> str:
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _with_protocol(uri: str, path: str) -> str:
    return uri.split("://", 1)[0] + "://" + path if "://" in uri else path


def affectnet_images_root(csv_uri: str, storage_options: dict | None = None) -> str:
    """The ``Manually_Annotated_Images/`` folder of an AffectNet CSV: beside the CSV (the demo
    corpus) or beside the CSV's folder (the release's ``Manually_Annotated_file_lists/``)."""
    fs, path = url_to_fs(csv_uri, storage_options)
    folder = posixpath.dirname(path.rstrip("/"))
    tried = [posixpath.join(folder, AFFECTNET_IMAGES)]
    if "/" in folder.strip("/") or "://" not in csv_uri:  # never above an S3 bucket
        tried.append(posixpath.join(posixpath.dirname(folder), AFFECTNET_IMAGES))
    for candidate in tried:
        if fs.isdir(candidate):
            return _with_protocol(csv_uri, candidate)
    raise ValueError(f"no {AFFECTNET_IMAGES}/ beside {csv_uri} or beside its folder "
                     f"({', '.join(_with_protocol(csv_uri, t) for t in tried)}): pass the image folder "
                     "with --affectnet-images (distill: --images-root)")


def affectnet_csv(root: str, split: str, storage_options: dict | None = None) -> str:
    """AffectNet's ``{split}.csv`` under a dataset folder: at its top (the demo corpus) or in
    ``Manually_Annotated_file_lists/`` (the release)."""
    fs, path = url_to_fs(root, storage_options)
    tried = [posixpath.join(path.rstrip("/"), f"{split}.csv"),
             posixpath.join(path.rstrip("/"), AFFECTNET_FILE_LISTS, f"{split}.csv")]
    for candidate in tried:
        if fs.isfile(candidate):
            return _with_protocol(root, candidate)
    raise ValueError(f"no AffectNet {split}.csv in {root} or in its {AFFECTNET_FILE_LISTS}/")


def is_affectnet_csv(uri: str, storage_options: dict | None = None) -> bool:
    if not uri.lower().endswith(".csv"):
        return False
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").splitlines()[:1]
    return bool(head) and head[0].split(",")[0].strip() == "subDirectory_filePath"


def is_fec_csv(uri: str, storage_options: dict | None = None) -> bool:
    """A headerless CSV whose first row names a triplet type in column 16 (Google FEC layout)."""
    if not uri.lower().endswith(".csv"):
        return False
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        head = f.read(8192).decode("utf-8", errors="replace").splitlines()[:1]
    row = next(csv.reader(head), []) if head else []
    return len(row) > 15 and row[15].strip() in FEC_TYPES


def read_affectnet(csv_uri: str, images_root: str | None = None, storage_options: dict | None = None) -> Manifest:
    """AffectNet ``training.csv`` / ``validation.csv``: records with ``crop_id``, ``source``
    (image URI under ``images_root``, default :func:`affectnet_images_root`), ``box`` (x1, y1, x2, y2
    pixels), ``label`` 0-7, ``valence``, ``arousal``. Labels 8-10 (none, uncertain, non-face) are skipped."""
    reader = csv.reader(io.StringIO(_read_text(csv_uri, storage_options)))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header[:9]) != AFFECTNET_COLUMNS:
        raise ValueError(f"{csv_uri} is not an AffectNet CSV (expected columns {', '.join(AFFECTNET_COLUMNS)})")
    root = (images_root or affectnet_images_root(csv_uri, storage_options)).rstrip("/")
    out = Manifest(images_root=root)
    for line, row in enumerate(reader, start=2):
        if not row or not any(c.strip() for c in row):
            continue
        try:
            if len(row) < 9:
                raise ValueError(f"{len(row)} fields, expected 9")
            rel = row[0].strip()
            if not rel or rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"bad image path {rel!r}")
            x, y, w, h = (float(v) for v in row[1:5])
            label = int(float(row[6]))
            valence, arousal = float(row[7]), float(row[8])
            if w <= 0 or h <= 0:
                raise ValueError("empty face box")
        except ValueError as e:
            out.rejected.append({"line": line, "reason": str(e)})
            continue
        if not 0 <= label <= 10:
            out.rejected.append({"line": line, "reason": f"expression {label} outside 0-10"})
            continue
        if label > 7:
            out.rejected.append({"line": line, "reason": f"expression {label} (8-10 are not used)"})
            continue
        out.records.append({"crop_id": f"affectnet:{rel}", "source": f"{root}/{rel}",
                             "box": (x, y, x + w, y + h), "label": label, "valence": valence, "arousal": arousal})
    return out


def fec_image_name(url: str) -> str:
    """File name the FEC image fetcher stores ``url`` under (stable, flat, no path from the URL)."""
    ext = os.path.splitext(url.split("?", 1)[0])[1].lower()
    ext = ext if ext in (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp") else ".jpg"
    return hashlib.sha1(url.encode()).hexdigest()[:24] + ext


def fec_crop_id(url: str, box: tuple[float, float, float, float]) -> str:
    return "fec:" + hashlib.sha1(f"{url}|{box}".encode()).hexdigest()[:20]


def read_fec(csv_uri: str, images_root: str | None = None, storage_options: dict | None = None) -> Manifest:
    """Google FEC CSV (no header): three images ``URL, x_left, x_right, y_top, y_bottom`` (fractions),
    the triplet type, then (annotator, answer) pairs where the answer names the most different image.

    Records: ``{"faces": [3 x {crop_id, url, source, box_frac (x1, y1, x2, y2)}], "type": 0|1|2,
    "pair": (i, j), "odd": k}`` with the majority answer; ties are rejected. ``source`` is the
    fetched copy under ``images_root`` (default: ``images/`` beside the CSV), named by
    :func:`fec_image_name`."""
    root = (images_root or _parent(csv_uri) + "/images").rstrip("/")
    out = Manifest(images_root=root)
    for line, row in enumerate(csv.reader(io.StringIO(_read_text(csv_uri, storage_options))), start=1):
        row = [c.strip() for c in row]
        if not any(row):
            continue
        try:
            if len(row) < 18:
                raise ValueError(f"{len(row)} fields, expected at least 18")
            faces = []
            for i in range(3):
                url = row[5 * i]
                xl, xr, yt, yb = (float(v) for v in row[5 * i + 1:5 * i + 5])
                if not url or not (0 <= xl < xr <= 1 and 0 <= yt < yb <= 1):
                    raise ValueError(f"image {i + 1}: bad URL or box")
                box = (xl, yt, xr, yb)
                faces.append({"crop_id": fec_crop_id(url, box), "url": url,
                              "source": f"{root}/{fec_image_name(url)}", "box_frac": box})
            if row[15] not in FEC_TYPES:
                raise ValueError(f"unknown triplet type {row[15]!r}")
            answers = row[16:]
            if len(answers) % 2:
                raise ValueError("annotator/answer pairs are incomplete")
            votes = Counter(int(a) for a in answers[1::2])
            if not votes or any(v not in (1, 2, 3) for v in votes):
                raise ValueError("answers must be 1, 2 or 3")
        except ValueError as e:
            out.rejected.append({"line": line, "reason": str(e)})
            continue
        (top, n), *rest = votes.most_common()
        if rest and rest[0][1] == n:
            out.rejected.append({"line": line, "reason": "annotators are tied"})
            continue
        odd = top - 1
        pair = tuple(i for i in range(3) if i != odd)
        out.records.append({"faces": faces, "type": FEC_TYPES[row[15]], "pair": pair, "odd": odd})
    return out


def read_arff(uri: str, storage_options: dict | None = None) -> tuple[list[float], list[float], int]:
    """(frame times, gold values, rejected lines) of a RECOLA gold-standard ARFF."""
    times, values, rejected = [], [], 0
    in_data = False
    for line in _read_text(uri, storage_options).splitlines():
        line = line.strip()
        if not line or line.startswith("%"):
            continue
        if not in_data:
            in_data = line.lower().startswith("@data")
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) < 3:
                raise ValueError
            t, v = float(parts[-2]), float(parts[-1])
            if not -1.5 <= v <= 1.5:
                raise ValueError
        except ValueError:
            rejected += 1
            continue
        times.append(t)
        values.append(v)
    return times, values, rejected


def read_recola(root: str, storage_options: dict | None = None) -> Manifest:
    """Sessions of a RECOLA (AVEC 2016) folder: ``recordings_audio/*.wav``, ``recordings_video/*.mp4``,
    ``ratings_gold_standard/{arousal,valence}/*.arff``. Records: name, split (train/dev/test), audio,
    video (URIs or None), arousal_arff, valence_arff. A session without both ratings is rejected."""
    fs, path = url_to_fs(root, storage_options)
    fs.invalidate_cache()
    base = root.rstrip("/")

    def names(sub: str, ext: str) -> set[str]:
        folder = f"{path.rstrip('/')}/{sub}"
        if not fs.exists(folder):
            return set()
        return {os.path.basename(p)[: -len(ext)] for p in fs.ls(folder, detail=False) if p.endswith(ext)}

    audio, video = names("recordings_audio", ".wav"), names("recordings_video", ".mp4")
    arousal = names("ratings_gold_standard/arousal", ".arff")
    valence = names("ratings_gold_standard/valence", ".arff")
    out = Manifest()
    for name in sorted(audio | video | arousal | valence):
        if name not in arousal or name not in valence:
            out.rejected.append({"line": name, "reason": "missing arousal or valence gold standard"})
            continue
        if name not in audio and name not in video:
            out.rejected.append({"line": name, "reason": "no audio and no video recording"})
            continue
        out.records.append({
            "name": name, "split": name.split("_", 1)[0],
            "audio": f"{base}/recordings_audio/{name}.wav" if name in audio else None,
            "video": f"{base}/recordings_video/{name}.mp4" if name in video else None,
            "arousal_arff": f"{base}/ratings_gold_standard/arousal/{name}.arff",
            "valence_arff": f"{base}/ratings_gold_standard/valence/{name}.arff",
        })
    return out
