"""Face tracks that are people: detections linked across sampled frames by motion (a constant-velocity
Kalman prediction of each box, global assignment, low-confidence detections kept to extend tracks, as
SORT and ByteTrack do), ended at shot cuts (a colour-histogram distance between consecutive frames),
then linked across misses and cuts by appearance when identity embeddings are given."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TRACKING_VERSION = 2
"""What a track id means: 1 was greedy box overlap; 2 is this module. Outputs and the features caches
that depend on tracks carry it."""


@dataclass
class TrackerConfig:
    """How detections become tracks and tracks become people."""

    high_prob: float = 0.9
    """Detections at or above this start tracks and are matched first."""
    low_prob: float = 0.7
    """Detections from this up to ``high_prob`` only extend a track they overlap (never start one)."""
    min_iou: float = 0.2
    """Overlap with a track's predicted box below which a match needs its centre within half a box side."""
    low_min_iou: float = 0.4
    """Overlap a low-confidence detection needs with a track's predicted box."""
    max_gap: int = 10
    """Sampled frames a track is kept, predicted, without a detection (2 s at 5 fps)."""
    cut_distance: float = 0.4
    """Colour-histogram distance (0-1) between consecutive sampled frames that marks a shot cut."""
    link_similarity: float = 0.6
    """Cosine similarity of mean identity embeddings from which a later track is the same person."""
    link_margin: float = 0.1
    """... and by which it must beat the next most similar person (else it is a new person)."""
    min_frames: int = 3
    """People seen in fewer sampled frames than this are left out (spurious detections)."""

    def __post_init__(self) -> None:
        if not 0 <= self.low_prob <= self.high_prob <= 1:
            raise ValueError("TrackerConfig: need 0 <= low_prob <= high_prob <= 1")
        if not (0 < self.min_iou <= 1 and 0 < self.low_min_iou <= 1 and 0 < self.cut_distance <= 1):
            raise ValueError("TrackerConfig: min_iou, low_min_iou and cut_distance must be in (0, 1]")
        if self.max_gap < 0 or self.min_frames < 1 or not -1 <= self.link_similarity <= 1 or self.link_margin < 0:
            raise ValueError("TrackerConfig: max_gap >= 0, min_frames >= 1, link_similarity in [-1, 1], "
                             "link_margin >= 0")


HIST_BINS = 16


def colour_histogram(view: np.ndarray) -> np.ndarray:
    """Per-channel histograms (16 bins) of an RGB uint8 frame, every 4th pixel, each summing to 1:
    [3 * 16] float32 (what a shot cut changes; PySceneDetect's content detector compares the like)."""
    px = np.asarray(view, np.uint8)[::4, ::4]
    px = px.reshape(-1, px.shape[2] if px.ndim == 3 else 1)[:, :3]
    hist = np.concatenate([np.bincount(px[:, c] >> 4, minlength=HIST_BINS) for c in range(px.shape[1])])
    return hist.astype(np.float32) / max(1, len(px))


def histogram_distance(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Half the L1 distance of two :func:`colour_histogram` per channel, averaged over the channels:
    0 for the same colours, 1 for none in common (0 when either is missing)."""
    if a is None or b is None or a.shape != b.shape:
        return 0.0
    return float(np.abs(a - b).sum() / (2 * (len(a) // HIST_BINS)))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes [N, 4] against boxes [M, 4] (x1, y1, x2, y2): [N, M]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class _Kalman:
    """Constant-velocity Kalman filter of a box as (centre x, centre y, width, height) and their
    velocities per sampled frame; noise scales with the box's height (as DeepSORT's)."""

    _F = np.eye(8) + np.eye(8, k=4)
    _H = np.eye(4, 8)

    def __init__(self, box: np.ndarray) -> None:
        z = _xywh(box)
        self.x = np.concatenate([z, np.zeros(4)])
        s = max(z[3], 1.0)
        self.P = np.diag(np.square([s / 10, s / 10, s / 10, s / 10, s / 8, s / 8, s / 8, s / 8]))

    def predict(self) -> None:
        s = max(self.x[3], 1.0)
        q = np.diag(np.square([s / 20, s / 20, s / 20, s / 20, s / 80, s / 80, s / 80, s / 80]))
        self.x = self._F @ self.x
        self.P = self._F @ self.P @ self._F.T + q

    def update(self, box: np.ndarray) -> None:
        z = _xywh(box)
        s = max(z[3], 1.0)
        r = np.diag(np.square([s / 20, s / 20, s / 20, s / 20]))
        y = z - self._H @ self.x
        pht = self.P @ self._H.T
        k = pht @ np.linalg.inv(self._H @ pht + r)
        self.x = self.x + k @ y
        self.P = (np.eye(8) - k @ self._H) @ self.P

    @property
    def box(self) -> np.ndarray:
        cx, cy, w, h = self.x[:4]
        w, h = max(w, 1.0), max(h, 1.0)
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _xywh(box) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])


@dataclass
class Track:
    """One motion-linked run of a face."""

    track_id: int
    first: int
    """First sampled frame."""
    last: int
    """Last sampled frame with a detection."""
    kalman: _Kalman
    frames: int = 0
    """Sampled frames with a detection."""
    weight: float = 0.0
    """Sum of probability x box area: how much and how large it was on screen."""
    ended: bool = False
    """Ended by a shot cut or a gap longer than max_gap: no later detection joins it."""
    identity_sum: np.ndarray | None = None
    """Sum of its identity embeddings (when given)."""


@dataclass
class FaceTracker:
    """Links each sampled frame's detections to tracks (:meth:`update`, frames in order), then tracks
    to people (:meth:`people`).

    Each live track's box is predicted one sampled frame ahead; confident detections are assigned to
    the predictions globally (the most overlap in total, a centre within half a box side counting as a
    little overlap), then low-confidence ones to the tracks still unmatched that they overlap well; a
    confident detection left over starts a track, a low one is dropped. A track unseen for more than
    ``max_gap`` frames, or alive at a shot cut, ends. The primary person is the one with the largest
    sum of probability x box area over the video: on screen longest and largest.
    """

    config: TrackerConfig = field(default_factory=TrackerConfig)
    tracks: list[Track] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    """Sampled frames that begin a new shot."""
    _step: int = field(default=-1, init=False, repr=False)

    def update(self, step: int, detections: list, *, cut: bool = False,
               identities: list[np.ndarray | None] | None = None) -> list[int | None]:
        """Track ids of ``detections`` (objects with ``box`` and ``prob``) seen at sampled frame
        ``step`` (None: a low-confidence detection no track took); ``cut``: this frame begins a
        new shot; ``identities``: each detection's identity embedding, if any."""
        from scipy.optimize import linear_sum_assignment

        cfg = self.config
        if step <= self._step:
            raise ValueError(f"FaceTracker.update: sampled frame {step} after {self._step}: frames go in order")
        if cut and step > 0:
            self.cuts.append(step)
        live = []
        for t in self.tracks:
            if t.ended:
                continue
            if cut or step - t.last > cfg.max_gap:
                t.ended = True
                continue
            for _ in range(step - self._step):
                t.kalman.predict()
            live.append(t)
        self._step = step
        ids: list[int | None] = [None] * len(detections)
        high = [i for i, d in enumerate(detections) if d.prob >= cfg.high_prob]
        low = [i for i, d in enumerate(detections) if cfg.low_prob <= d.prob < cfg.high_prob]
        matched: set[int] = set()
        for pool, gate in ((high, None), (low, cfg.low_min_iou)):
            free = [t for t in live if t.track_id not in matched]
            if not pool or not free:
                continue
            sim = self._similarity([detections[i].box for i in pool], [t.kalman.box for t in free], gate)
            rows, cols = linear_sum_assignment(-sim)
            for r, c in zip(rows, cols):
                if sim[r, c] > 0:
                    ids[pool[r]] = free[c].track_id
                    matched.add(free[c].track_id)
        for i in high:
            if ids[i] is None:
                t = Track(len(self.tracks), step, step, _Kalman(detections[i].box))
                self.tracks.append(t)
                ids[i] = t.track_id
        for i, tid in enumerate(ids):
            if tid is None:
                continue
            t, det = self.tracks[tid], detections[i]
            if t.frames:
                t.kalman.update(det.box)
            t.last, t.frames = step, t.frames + 1
            t.weight += det.prob * float((det.box[2] - det.box[0]) * (det.box[3] - det.box[1]))
            emb = identities[i] if identities is not None else None
            if emb is not None:
                emb = np.asarray(emb, np.float64)
                t.identity_sum = emb if t.identity_sum is None else t.identity_sum + emb
        return ids

    def _similarity(self, dets: list, preds: list, gate: float | None) -> np.ndarray:
        """[detections, tracks]: IoU with the predicted box; below ``min_iou`` (first stage) a centre
        within half a box side scores less than any overlap that passes; 0 means no match."""
        cfg = self.config
        iou = box_iou(np.array(dets), np.array(preds))
        if gate is not None:
            return np.where(iou >= gate, iou, 0.0)
        d, p = np.array(dets, np.float64), np.array(preds, np.float64)
        dc, pc = (d[:, :2] + d[:, 2:]) / 2, (p[:, :2] + p[:, 2:]) / 2
        dist = np.linalg.norm(dc[:, None] - pc[None], axis=2)
        half = 0.5 * np.maximum(p[:, 2] - p[:, 0], p[:, 3] - p[:, 1])[None]
        near = np.where(dist < half, 0.5 * cfg.min_iou * (1 - dist / half), 0.0)
        return np.where(iou >= cfg.min_iou, iou, near)

    def people(self) -> dict[int, int]:
        """Track id -> person id (0, 1, ... in order of first appearance) for the tracks kept (at least
        ``min_frames`` frames as a person). A track that starts after others ended (a miss longer than
        ``max_gap``, a cut) joins the person whose mean identity embedding is most similar, if that is
        at least ``link_similarity`` and beats the next person by ``link_margin``; without identity
        embeddings each track is a person."""
        cfg = self.config
        groups: list[dict] = []  # {"tracks": [...], "last": int, "sum": array | None, "n": int}
        of: dict[int, int] = {}
        for t in sorted(self.tracks, key=lambda t: (t.first, t.track_id)):
            best, runner_up, best_sim = None, -np.inf, -np.inf
            mean = _unit(t.identity_sum)
            if mean is not None:
                for g, group in enumerate(groups):
                    if group["last"] >= t.first or group["sum"] is None:
                        continue  # on screen together: not one person
                    sim = float(mean @ _unit(group["sum"]))
                    if sim > best_sim:
                        best, runner_up, best_sim = g, best_sim, sim
                    elif sim > runner_up:
                        runner_up = sim
            if best is not None and best_sim >= cfg.link_similarity and best_sim - runner_up >= cfg.link_margin:
                group = groups[best]
                group["tracks"].append(t.track_id)
                group["last"] = max(group["last"], t.last)
                group["sum"] = group["sum"] + t.identity_sum
            else:
                groups.append({"tracks": [t.track_id], "last": t.last, "sum": t.identity_sum})
        person = 0
        for group in groups:
            if sum(self.tracks[tid].frames for tid in group["tracks"]) < cfg.min_frames:
                continue
            for tid in group["tracks"]:
                of[tid] = person
            person += 1
        return of

    def primary(self, people: dict[int, int] | None = None) -> int | None:
        """The primary person (largest sum of probability x box area), None without one."""
        people = self.people() if people is None else people
        weight: dict[int, float] = {}
        for tid, pid in people.items():
            weight[pid] = weight.get(pid, 0.0) + self.tracks[tid].weight
        return max(sorted(weight), key=lambda p: weight[p]) if weight else None


def _unit(v: np.ndarray | None) -> np.ndarray | None:
    if v is None:
        return None
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else None
