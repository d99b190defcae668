"""Scenes with known identities for the face tracker: who is where at each sampled frame (5 fps), as a
detector would report it (occluded faces missed, small background faces at low confidence), and the
same scenes rendered as videos (tinted copies of a real face photo, one tint per person, one
background colour per shot) for the jobs end to end."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

W, H = 640, 360
TINTS = ((1.0, 0.75, 0.75), (0.7, 0.8, 1.0), (0.8, 1.0, 0.7), (1.0, 1.0, 0.6))
SHOTS = ((70, 90, 110), (150, 120, 60), (40, 110, 60))


@dataclass
class Face:
    person: int
    box: np.ndarray
    prob: float


@dataclass
class Scene:
    name: str
    frames: list[list[Face]]
    """Each sampled frame's faces, as a detector finds them."""
    shots: list[int]
    """Each sampled frame's shot (a change is a cut)."""
    people: int = field(init=False)

    def __post_init__(self) -> None:
        self.people = len({f.person for faces in self.frames for f in faces})

    @property
    def cuts(self) -> list[bool]:
        return [i > 0 and self.shots[i] != self.shots[i - 1] for i in range(len(self.shots))]


def _box(cx, cy, side):
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float64)


def _jitter(rng, box, px=1.5):
    return box + rng.normal(0, px, 4)


def _occlude(faces: list[Face]) -> list[Face]:
    """A face mostly behind a larger (nearer) one is not detected."""
    from aver.tracking import box_iou

    kept = []
    for f in faces:
        behind = any(g is not f and (g.box[2] - g.box[0]) >= (f.box[2] - f.box[0]) and
                     box_iou(f.box, g.box)[0, 0] > 0.3 and g.person < f.person for g in faces)
        if not behind:
            kept.append(f)
    return kept


def walking(seed=0) -> Scene:
    rng = np.random.default_rng(seed)
    # across the frame in 3 s: 36 px a sampled frame, more than half the face's side
    frames = [[Face(0, _jitter(rng, _box(40 + 36 * i, 150 + 8 * np.sin(i / 2), 64)), 0.99)] for i in range(16)]
    return Scene("walking", frames, [0] * 16)


def crossing(seed=0) -> Scene:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(24):
        a = Face(0, _jitter(rng, _box(50 + 23 * i, 160, 72)), 0.99)
        b = Face(1, _jitter(rng, _box(590 - 23 * i, 176, 66)), 0.98)
        frames.append(_occlude([a, b]))
    return Scene("crossing", frames, [0] * 24)


def misses(seed=0) -> Scene:
    rng = np.random.default_rng(seed)
    gone = {10, 11, 12, 25, 26}  # 0.6 s and 0.4 s without a detection
    frames = [[] if i in gone else [Face(0, _jitter(rng, _box(60 + 12 * i, 170, 70)), 0.99)] for i in range(45)]
    return Scene("misses", frames, [0] * 45)


def leave_and_return(seed=0) -> Scene:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(45):
        faces = [Face(1, _jitter(rng, _box(480, 170, 80)), 0.99)]
        if i < 15:
            faces.append(Face(0, _jitter(rng, _box(120 + 4 * i, 160, 76)), 0.99))
        elif i >= 30:  # back after 3 s, elsewhere
            faces.append(Face(0, _jitter(rng, _box(260 - 3 * (i - 30), 190, 76)), 0.99))
        frames.append(faces)
    return Scene("leave_and_return", frames, [0] * 45)


def cut_and_back(seed=0) -> Scene:
    rng = np.random.default_rng(seed)
    frames, shots = [], []
    for i in range(45):
        shot = 0 if i < 15 or i >= 30 else 1
        person = 0 if shot == 0 else 1  # the other person, framed where the first one was
        frames.append([Face(person, _jitter(rng, _box(320 + 2 * (i % 15), 170, 90)), 0.99)])
        shots.append(shot)
    return Scene("cut_and_back", frames, shots)


def background(seed=0) -> Scene:
    """One near face talking, two small faces walking behind, found at low confidence now and then."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(50):
        faces = [Face(0, _jitter(rng, _box(320, 200, 110), 2.0), 0.99)]
        for person, x0, v, y in ((1, 40, 9, 70), (2, 600, -8, 90)):
            if i % 7 == 3:
                continue  # missed now and then
            prob = 0.93 if i % 3 else 0.78  # a third of them below the confident threshold
            faces.append(Face(person, _jitter(rng, _box(x0 + v * i, y, 30), 0.8), prob))
        frames.append(_occlude(faces))
    return Scene("background", frames, [0] * 50)


SCENES = {s.__name__: s for s in (walking, crossing, misses, leave_and_return, cut_and_back, background)}


def identity(person: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """A deterministic identity embedding per person (unit length, people far apart)."""
    v = np.random.default_rng(1000 + person + 97 * seed).normal(size=dim)
    return v / np.linalg.norm(v)


def track_scene(scene: Scene, tracker, *, cuts: bool = True, identities: bool = False) -> list[list[int | None]]:
    """The tracker's ids for each frame's faces, in the scene's order."""
    out = []
    for step, (faces, cut) in enumerate(zip(scene.frames, scene.cuts)):
        out.append(tracker.update(step, faces, cut=cuts and cut,
                                  identities=[identity(f.person) for f in faces] if identities else None))
    return out


def id_scores(scene: Scene, predicted: list[list[int | None]]) -> tuple[float, int, int]:
    """(IDF1, identity switches, predicted ids) of ``predicted`` (ids per face) against the scene's people.
    IDF1 = 2 IDTP / (ground-truth detections + predicted detections), IDTP the most detections a
    one-to-one person <-> predicted-id matching gets right (Ristani et al. 2016). A switch: a person's
    predicted id differs from the one at their previous detection, or an id passes to another person."""
    from scipy.optimize import linear_sum_assignment

    pairs = [(f.person, p) for faces, ids in zip(scene.frames, predicted) for f, p in zip(faces, ids)]
    pred_ids = sorted({p for _, p in pairs if p is not None})
    counts = np.zeros((scene.people, max(1, len(pred_ids))))
    for person, p in pairs:
        if p is not None:
            counts[person, pred_ids.index(p)] += 1
    rows, cols = linear_sum_assignment(-counts)
    idtp = counts[rows, cols].sum()
    n_pred = sum(p is not None for _, p in pairs)
    idf1 = 2 * idtp / (len(pairs) + n_pred)
    switches, last_id, last_person = 0, {}, {}
    for person, p in pairs:
        if p is None:
            continue
        # a person's id changes, or an id passes to another person (two people merged into one track)
        if last_id.get(person, p) != p or last_person.get(p, person) != person:
            switches += 1
        last_id[person], last_person[p] = p, person
    return float(idf1), switches, len(pred_ids)


def render(scene: Scene, path: str, fps: float = 5.0, scale: float = 0.5, audio: bool = True) -> None:
    """The scene as an H.264 video at ``fps`` (one video frame per sampled frame), ``scale`` of its size."""
    from PIL import Image

    from aver.demo.media import write_video
    from tests.media_fixtures import face_patch, tone

    patch = face_patch(160)
    w, h = int(W * scale), int(H * scale)
    rng = np.random.default_rng(1)
    noise = rng.integers(-12, 12, size=(h, w, 3))
    frames = []
    for faces, shot in zip(scene.frames, scene.shots):
        img = np.clip(np.array(SHOTS[shot % len(SHOTS)])[None, None] + noise, 0, 255).astype(np.uint8)
        for f in sorted(faces, key=lambda f: -f.person):  # nearer (lower) people drawn last, on top
            x1, y1, x2, y2 = (int(round(v * scale)) for v in f.box)
            side = max(8, x2 - x1)
            face = np.asarray(Image.fromarray(patch).resize((side, side), Image.BILINEAR)).astype(np.float32)
            face = (face * np.array(TINTS[f.person % len(TINTS)])).astype(np.uint8)
            xa, ya = max(0, x1), max(0, y1)
            xb, yb = min(w, x1 + side), min(h, y1 + side)
            if xb > xa and yb > ya:
                img[ya:yb, xa:xb] = face[ya - y1:yb - y1, xa - x1:xb - x1]
        frames.append(img)
    write_video(path, frames, fps, audio=tone(len(frames) / fps) if audio else None)
