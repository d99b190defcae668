"""Procedural faces and voices whose expression and prosody carry learnable affect labels.

Used by ``jobs/make_demo_corpus.py`` (the offline demo corpus, SPEC §7) and the tests. Labels are
carried only by drawn facial features (mouth, brows, eyes) and by voice prosody (pitch, energy,
brightness); identity, pose, scale, lighting, background and noise vary independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from aver.constants import AFFECTNET_CLASSES, FEC_TRIPLET_TYPES, SAMPLE_RATE

# Expression parameters: mouth curve (+ smile), mouth open, brow raise, inner-brow tilt (+ up),
# eye openness, mouth asymmetry (contempt's smirk). One prototype per AffectNet class.
PARAMS = ("mouth_curve", "mouth_open", "brow_raise", "brow_tilt", "eye_open", "asymmetry")
PROTOTYPES = np.array([
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # Neutral
    [1.0, 0.35, 0.1, 0.0, -0.1, 0.0],   # Happy
    [-0.9, 0.0, 0.1, 0.9, -0.5, 0.0],   # Sad
    [0.0, 1.0, 1.0, 0.0, 1.0, 0.0],     # Surprise
    [-0.4, 0.6, 0.7, 0.8, 0.9, 0.0],    # Fear
    [-0.6, 0.25, -0.6, -0.2, -0.7, 0.0],  # Disgust
    [-0.5, 0.0, -0.9, -1.0, 0.4, 0.0],  # Anger
    [0.2, 0.0, 0.0, 0.0, -0.2, 0.9],    # Contempt
])
# Rough circumplex position of each class (valence, arousal), for AffectNet's continuous columns.
CLASS_VA = np.array([[0, 0], [0.8, 0.4], [-0.7, -0.4], [0.2, 0.8], [-0.6, 0.7], [-0.6, 0.3], [-0.7, 0.6], [-0.4, 0.1]])
assert len(PROTOTYPES) == len(CLASS_VA) == len(AFFECTNET_CLASSES)


@dataclass
class Identity:
    """Who is drawn: nuisance factors that must not predict the label."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    background: tuple[int, int, int]
    width: float
    eye_spacing: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Identity":
        tone = rng.uniform(0.45, 1.0)
        skin = tuple(int(c * tone) for c in (236, 188, 160))
        hair = tuple(int(v) for v in rng.integers(10, 110, 3))
        background = tuple(int(v) for v in rng.integers(40, 200, 3))
        return cls(skin, hair, background, float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.85, 1.15)))


def sample_expression(label: int, rng: np.random.Generator, intensity: tuple[float, float] = (0.6, 1.0),
                      noise: float = 0.12) -> np.ndarray:
    """Expression parameters for an AffectNet class: its prototype at a random intensity, plus noise."""
    return np.clip(PROTOTYPES[label] * rng.uniform(*intensity) + rng.normal(0, noise, len(PARAMS)), -1, 1)


def expression_from_affect(valence: float, arousal: float) -> np.ndarray:
    """Expression for a continuous (valence, arousal) state: valence drives the mouth and inner
    brows, arousal the eyes, brow height and mouth opening."""
    v, a = float(valence), float(arousal)
    return np.clip(np.array([v, 0.6 * max(a, 0.0), 0.7 * a, -0.6 * min(v, 0.0), 0.8 * a, 0.0]), -1, 1)


def draw_face(expr: np.ndarray, identity: Identity, size: int = 160, *, rng: np.random.Generator | None = None,
              pose: float = 0.0, lighting: float = 1.0) -> np.ndarray:
    """A ``size`` x ``size`` RGB face (uint8) with the given expression; ``pose`` rotates (degrees),
    ``lighting`` scales brightness."""
    mc, mo, br, bt, eo, asym = (float(x) for x in expr)
    s = 4  # draw at 4x and downsample: smooth edges
    w = size * s
    im = Image.new("RGB", (w, w), identity.background)
    d = ImageDraw.Draw(im)
    cx, cy = w / 2, w / 2
    fw, fh = w * 0.33 * identity.width, w * 0.43
    d.ellipse([cx - fw * 1.06, cy - fh * 1.08, cx + fw * 1.06, cy + fh * 0.15], fill=identity.hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=identity.skin)
    shade = tuple(int(c * 0.7) for c in identity.skin)
    ey, ex = cy - fh * 0.15, fw * 0.42 * identity.eye_spacing
    eh, ew = fh * 0.07 * (1 + 0.8 * eo), fw * 0.24
    for side in (-1, 1):
        x0 = cx + side * ex
        d.ellipse([x0 - ew, ey - eh, x0 + ew, ey + eh], fill=(245, 245, 245), outline=(40, 30, 30), width=2 * s)
        r = min(eh, ew) * 0.75
        d.ellipse([x0 - r, ey - r, x0 + r, ey + r], fill=(70, 45, 30))
        d.ellipse([x0 - r * 0.45, ey - r * 0.45, x0 + r * 0.45, ey + r * 0.45], fill=(10, 10, 10))
        outer_y = ey - fh * 0.19 - fh * 0.14 * br
        inner_y = outer_y - fh * 0.12 * bt
        # Bold strokes (about 1/25 of the face): thin lines vanish in a randomly initialised CNN.
        d.line([x0 - side * ew * 0.8, inner_y, x0 + side * ew * 1.15, outer_y],
               fill=tuple(int(c * 0.45) for c in identity.hair), width=int(fw * 0.09))
    d.polygon([(cx, cy - fh * 0.05), (cx - fw * 0.13, cy + fh * 0.22), (cx + fw * 0.13, cy + fh * 0.22)], fill=shade)
    my, mw = cy + fh * 0.47, fw * 0.5
    top, bottom = [], []
    for t in np.linspace(-1, 1, 25):
        x = cx + t * mw
        y = my - mc * fh * 0.16 * (t * t) + mc * fh * 0.08 + asym * fh * 0.12 * t
        top.append((x, y - fh * 0.025))
        bottom.append((x, y + fh * 0.03 + mo * fh * 0.2 * (1 - t * t)))
    d.polygon(top + bottom[::-1], fill=(120, 25, 35))
    if pose:
        im = im.rotate(pose, resample=Image.BILINEAR, fillcolor=identity.background)
    im = im.resize((size, size), Image.LANCZOS)
    if lighting != 1.0:
        im = ImageEnhance.Brightness(im).enhance(lighting)
    arr = np.asarray(im).astype(np.float32)
    if rng is not None:
        arr += rng.normal(0, 4.0, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def place_face(face: np.ndarray, canvas_hw: tuple[int, int], rng: np.random.Generator,
               background: tuple[int, int, int] | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Paste ``face`` at a random position on a noisy canvas; returns the image and the face box."""
    h, w = canvas_hw
    fh, fw = face.shape[:2]
    base = np.array(background if background is not None else rng.integers(30, 220, 3), dtype=np.float32)
    canvas = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    y, x = int(rng.integers(0, h - fh + 1)), int(rng.integers(0, w - fw + 1))
    canvas[y:y + fh, x:x + fw] = face
    return canvas, (x, y, fw, fh)


def face_box(tile: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The box a face annotator or detector puts around a face drawn in ``tile`` (x, y, w, h, as
    ``place_face`` returns): cheek to cheek and brows to chin, like AffectNet's and FEC's boxes and
    MTCNN's, not the whole square the face was drawn in (whose crop would shrink the face to half
    the crop)."""
    x, y, w, h = tile
    return round(x + 0.18 * w), round(y + 0.2 * h), round(0.64 * w), round(0.73 * h)


def smooth_trajectory(n: int, rng: np.random.Generator, *, step_s: float = 0.04, amplitude: float = 0.8) -> np.ndarray:
    """A smooth signal in [-amplitude, amplitude] over ``n`` steps: a few slow random sinusoids."""
    t = np.arange(n) * step_s
    x = np.zeros(n)
    for _ in range(4):
        period = rng.uniform(6.0, 30.0)
        x += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    x /= max(np.abs(x).max(), 1e-6)
    return amplitude * x


def voice(valence: np.ndarray, arousal: np.ndarray, rng: np.random.Generator, *, sample_rate: int = SAMPLE_RATE,
          step_s: float = 0.04, base_pitch: float | None = None) -> np.ndarray:
    """Speech-like audio whose prosody follows per-step affect: arousal raises pitch and energy,
    valence brightens the timbre (slower harmonic roll-off). Syllable rhythm and noise are nuisance."""
    n = len(arousal)
    hop = int(round(step_s * sample_rate))
    length = n * hop
    t = np.arange(length) / sample_rate
    a = np.interp(t, np.arange(n) * step_s, arousal)
    v = np.interp(t, np.arange(n) * step_s, valence)
    f0 = (base_pitch or rng.uniform(100, 180)) * (1.0 + 0.45 * a)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    rolloff = 1.6 - 0.7 * v  # larger = darker
    x = sum(np.sin(k * phase) / k ** rolloff for k in range(1, 12))
    rate = rng.uniform(3.0, 5.0)
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6)) ** 2
    energy = 0.06 + 0.22 * (a + 1) / 2
    y = energy * syllables * x / 3.0 + rng.normal(0, 0.004, length)
    return y.astype(np.float32)


def write_arff(path: str, name: str, values: np.ndarray, step_s: float = 0.04) -> None:
    """A RECOLA (AVEC 2016) gold-standard ARFF: instance name, frame time, value per 40 ms."""
    lines = ["@relation GOLDSTANDARD", "", "@attribute Instance_name string", "@attribute frameTime numeric",
             "@attribute GoldStandard numeric", "", "@data", ""]
    lines += [f"'{name}',{i * step_s:.6f},{float(x):.6f}" for i, x in enumerate(values)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_wav(path: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono WAV (RECOLA's audio format)."""
    import wave

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


@dataclass(frozen=True)
class CorpusSize:
    affectnet_train: int
    affectnet_val: int
    fec_train: int
    fec_test: int
    sessions_train: int
    sessions_dev: int
    session_s: float
    unlabeled: int


SIZES = {
    "small": CorpusSize(96, 48, 60, 30, 2, 1, 12.0, 24),
    "medium": CorpusSize(800, 320, 400, 300, 12, 3, 40.0, 1200),
}
VIDEO_FPS = 10
STEP_S = 0.04  # RECOLA's 40 ms label frames


def _labelled_face(rng: np.random.Generator, label: int, canvas: tuple[int, int] = (200, 200)):
    face = draw_face(sample_expression(label, rng), Identity.random(rng), int(rng.integers(120, 170)), rng=rng,
                     pose=float(rng.uniform(-8, 8)), lighting=float(rng.uniform(0.8, 1.2)))
    img, tile = place_face(face, canvas, rng)
    return img, face_box(tile)


def _session_frames(valence: np.ndarray, arousal: np.ndarray, identity: Identity, rng: np.random.Generator,
                    hw: tuple[int, int] = (240, 320), face_at=lambda t: True):
    """Frames at VIDEO_FPS whose drawn expression follows the 40 ms affect trajectories."""
    n_frames = int(len(valence) * STEP_S * VIDEO_FPS)
    size = int(rng.integers(120, 160))
    background = identity.background
    drift = rng.uniform(0, 2 * np.pi)
    for i in range(n_frames):
        t = i / VIDEO_FPS
        k = min(int(t / STEP_S), len(valence) - 1)
        h, w = hw
        canvas = np.clip(np.array(background, np.float32) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        if face_at(t):
            expr = expression_from_affect(valence[k], arousal[k]) + rng.normal(0, 0.05, len(PARAMS))
            face = draw_face(expr, identity, size, pose=3 * np.sin(t / 3 + drift))
            x = int((w - size) / 2 + 20 * np.sin(t / 5 + drift))
            y = (h - size) // 2
            canvas[y:y + size, x:x + size] = face
        yield canvas


SESSION_CONTRAST = 60.0
"""Least luma difference between a session's skin and its background (0-255)."""


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def apart_from_skin(identity: Identity) -> Identity:
    """``identity`` with its background moved away from its skin's brightness (the side it is on,
    the other when that side has no room) until they differ by :data:`SESSION_CONTRAST` in luma. A
    dark face before a background of its own shade stayed under MTCNN's thresholds for most of a
    session (14 % of one seed's frames, 88 % once 54 apart): a session whose face is seldom found
    teaches and measures nothing about the face (docs/decisions.md, "The face carries valence")."""
    import dataclasses

    gap = _luma(identity.background) - _luma(identity.skin)
    if abs(gap) >= SESSION_CONTRAST:
        return identity
    side = 1.0 if gap > 0 else -1.0
    options = []
    for direction in (side, -side):
        shift = direction * SESSION_CONTRAST - gap  # the same shift on every channel moves luma by it
        moved = tuple(int(np.clip(round(c + shift), 0, 255)) for c in identity.background)
        if abs(_luma(moved) - _luma(identity.skin)) >= SESSION_CONTRAST - 0.5:
            return dataclasses.replace(identity, background=moved)
        options.append(moved)
    # neither side has room (a mid-grey skin before a saturated colour): as far apart as clipping allows
    return dataclasses.replace(identity, background=max(options, key=lambda b: abs(_luma(b) - _luma(identity.skin))))


def _session(rng: np.random.Generator, seconds: float):
    n = int(seconds / STEP_S)
    valence, arousal = smooth_trajectory(n, rng), smooth_trajectory(n, rng)
    return valence, arousal, apart_from_skin(Identity.random(rng)), voice(valence, arousal, rng, step_s=STEP_S)


def _rng(seed: int, *key: int) -> np.random.Generator:
    # One stream per item: the corpus is the same whatever the number of processes writing it.
    return np.random.default_rng([seed, *key])


def _affectnet_part(out: str, seed: int, split: str, indices: range) -> list[list]:
    import os

    rows = []
    for i in indices:
        rng = _rng(seed, 0 if split == "training" else 1, i)
        label = i % len(PROTOTYPES)
        img, (x, y, fw, fh) = _labelled_face(rng, label)
        rel = f"{split[:3]}{i // 100:03d}/{split}_{i:05d}.jpg"
        path = os.path.join(out, "affectnet", "Manually_Annotated_Images", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(img).save(path, quality=92)
        va = CLASS_VA[label] + rng.normal(0, 0.1, 2)
        rows.append([rel, x, y, fw, fh, "", label, f"{va[0]:.4f}", f"{va[1]:.4f}"])
    return rows




def _fec_part(out: str, seed: int, split: str, indices: range) -> list[str]:
    """Google FEC rows: URL + box fractions x3, type, (annotator, answer) pairs. URLs point at
    file:// sources; the fetch job copies them as it would download web images."""
    import os

    lines = []
    for t in indices:
        rng = _rng(seed, 2 if split == "train" else 3, t)
        kind = int(rng.integers(0, 3))
        first = int(rng.integers(0, 8))
        others = [c for c in range(8) if c != first]
        second = int(rng.choice(others))
        third = int(rng.choice([c for c in others if c != second]))
        labels = {0: [first] * 3, 1: [first, first, second], 2: [first, second, third]}[kind]
        # Like the real FEC (triplets kept where raters agree), keep only triplets whose closest pair
        # is clearly closer than the next one; the simulated raters still err below.
        while True:
            exprs = [sample_expression(label, rng, intensity=(0.3, 1.0), noise=0.08) for label in labels]
            d = sorted(np.linalg.norm(exprs[a] - exprs[b]) for a, b in ((1, 2), (0, 2), (0, 1)))
            if d[1] >= 2.0 * d[0]:
                break
        row = []
        for j, expr in enumerate(exprs):
            face = draw_face(expr, Identity.random(rng), int(rng.integers(120, 170)), rng=rng,
                             pose=float(rng.uniform(-8, 8)), lighting=float(rng.uniform(0.8, 1.2)))
            img, tile = place_face(face, (200, 200), rng)
            x, y, fw, fh = face_box(tile)
            path = os.path.abspath(os.path.join(out, "fec", "source", f"{split}{t:06d}_{j}.jpg"))
            Image.fromarray(img).save(path, quality=92)
            row += [f"file://{path}", f"{x / 200:.4f}", f"{(x + fw) / 200:.4f}", f"{y / 200:.4f}",
                    f"{(y + fh) / 200:.4f}"]
        order = rng.permutation(3)
        row = sum(([*row[5 * i:5 * i + 5]] for i in order), [])
        exprs = [exprs[i] for i in order]
        d = [np.linalg.norm(exprs[a] - exprs[b]) for a, b in ((1, 2), (0, 2), (0, 1))]  # pair without i
        odd = int(np.argmin(d))  # the image outside the closest pair is the most different
        answers = []
        for a in range(6):
            vote = odd if rng.random() > 0.15 else int(rng.integers(0, 3))
            answers += [f"annotator{a}", str(vote + 1)]
        lines.append(",".join(row + [FEC_TRIPLET_TYPES[kind]] + answers))
    return lines


def _recola_session(out: str, seed: int, split: str, i: int, seconds: float) -> None:
    """One RECOLA (AVEC 2016 layout) session: wav + mp4 + gold-standard ARFF per dimension."""
    import os

    from aver.demo.media import write_video

    rng = _rng(seed, 4 if split == "train" else 5, i)
    rec, name = os.path.join(out, "recola"), f"{split}_{i}"
    valence, arousal, identity, audio = _session(rng, seconds)
    write_wav(os.path.join(rec, "recordings_audio", f"{name}.wav"), audio)
    write_video(os.path.join(rec, "recordings_video", f"{name}.mp4"),
                _session_frames(valence, arousal, identity, rng), VIDEO_FPS, audio=audio)
    write_arff(os.path.join(rec, "ratings_gold_standard", "arousal", f"{name}.arff"), name, arousal)
    write_arff(os.path.join(rec, "ratings_gold_standard", "valence", f"{name}.arff"), name, valence)


def _unlabeled_part(out: str, seed: int, indices: range) -> None:
    import os

    from aver.faces import crop_face

    for i in indices:
        rng = _rng(seed, 6, i)
        img, (x, y, w, h) = _labelled_face(rng, int(rng.integers(0, 8)), canvas=(180, 180))
        crop = crop_face(img, (x, y, x + w, y + h))  # the PowderFaces role: MTCNN-style face crops
        Image.fromarray(crop).save(os.path.join(out, "unlabeled", f"u{i:05d}.jpg"), quality=92)


def _archive(out: str, seed: int, seconds: float) -> None:
    """A small archive for score_videos: speech + face, face only, audio only, no face, broken."""
    import os

    from aver.demo.media import write_video

    rng = _rng(seed, 7)
    arc = os.path.join(out, "archive")
    valence, arousal, identity, audio = _session(rng, seconds)
    write_video(os.path.join(arc, "interview.mp4"), _session_frames(valence, arousal, identity, rng),
                VIDEO_FPS, audio=audio)
    write_video(os.path.join(arc, "silent_face.mp4"), _session_frames(valence, arousal, identity, rng), VIDEO_FPS)
    write_video(os.path.join(arc, "no_face.mp4"),
                _session_frames(valence, arousal, identity, rng, face_at=lambda t: False), VIDEO_FPS, audio=audio)
    write_video(os.path.join(arc, "face_leaves.mp4"),
                _session_frames(valence, arousal, identity, rng, face_at=lambda t: t < seconds / 2),
                VIDEO_FPS, audio=audio)
    write_wav(os.path.join(arc, "podcast.wav"), audio)
    with open(os.path.join(arc, "broken.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 256, 2000, dtype=np.uint8)))


def _parts(n: int, per: int) -> list[range]:
    return [range(s, min(s + per, n)) for s in range(0, n, per)]


def write_corpus(out: str, seed: int = 0, size: str = "small", processes: int | None = None) -> dict[str, int]:
    """Write the demo corpus under ``out`` in the real datasets' layouts; returns counts. Items are
    drawn in ``processes`` worker processes (default: one per CPU); each item has its own random
    stream, so the corpus depends only on ``seed`` and ``size``. The processes are spawned: a script
    that calls this must do so under ``if __name__ == "__main__":``, as the jobs do."""
    import csv
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    for sub in ("affectnet", "fec/source", "unlabeled", "archive", "recola/recordings_audio",
                "recola/recordings_video", "recola/ratings_gold_standard/arousal",
                "recola/ratings_gold_standard/valence"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    # spawn: the caller may hold threads (Ray, torch) that fork would copy mid-state.
    with ProcessPoolExecutor(processes or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # the longest tasks first, so the pool's processes finish together
        sessions = [pool.submit(_recola_session, out, seed, split, i, cfg.session_s)
                    for split, n in (("train", cfg.sessions_train), ("dev", cfg.sessions_dev)) for i in range(1, n + 1)]
        archive = pool.submit(_archive, out, seed, min(cfg.session_s, 20.0))
        aff = {split: [pool.submit(_affectnet_part, out, seed, split, r) for r in _parts(n, 100)]
               for split, n in (("training", cfg.affectnet_train), ("validation", cfg.affectnet_val))}
        fec = {split: [pool.submit(_fec_part, out, seed, split, r) for r in _parts(n, 50)]
               for split, n in (("train", cfg.fec_train), ("test", cfg.fec_test))}
        unlabeled = [pool.submit(_unlabeled_part, out, seed, r) for r in _parts(cfg.unlabeled, 100)]
        counts: dict[str, int] = {}
        for split, futures in aff.items():
            rows = [row for f in futures for row in f.result()]
            with open(os.path.join(out, "affectnet", f"{split}.csv"), "w", newline="") as f:
                wr = csv.writer(f)
                wr.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                             "facial_landmarks", "expression", "valence", "arousal"])
                wr.writerows(rows)
            counts[f"affectnet_{split}"] = len(rows)
        for split, futures in fec.items():
            lines = [line for f in futures for line in f.result()]
            with open(os.path.join(out, "fec", f"faceexp-comparison-data-{split}-public.csv"), "w") as f:
                f.write("\n".join(lines) + "\n")
            counts[f"fec_{split}"] = len(lines)
        for f in [*sessions, archive, *unlabeled]:
            f.result()
    counts.update(recola_train=cfg.sessions_train, recola_dev=cfg.sessions_dev, unlabeled=cfg.unlabeled, archive=6)
    return counts
