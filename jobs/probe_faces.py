#!/usr/bin/env python
"""What the student's face features carry on a demo corpus (issue 32; docs/decisions.md, "The face
carries valence"): the figures that say where visual valence is lost.

  python jobs/probe_faces.py --corpus outputs/demo/corpus --models outputs/demo/models

For the RECOLA sessions, as the fusion featuriser sees them (MTCNN, tracks, the primary face, the
student at the fusion's frame rate): the share of frames with the primary face per session; a
ridge probe from the face's embeddings, centred per session as fusion reads them, to the gold
valence and arousal of each frame (fitted on the train sessions, CCC on dev); the student's class
against the class whose prototype is nearest the drawn expression (recomputed from the gold labels
by the generator's own mapping). For AffectNet's faces, which the student trained on: the same
ridge probe to their valence and arousal columns (training rows -> validation rows) and the
student's accuracy. Prints one Markdown table row per figure. No Ray: one process, the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from aver.constants import AFFECTNET_CLASSES
from aver.data.features import centred, face_features, student_features
from aver.data.manifests import read_affectnet, read_recola
from aver.data.recola import STEP_S, session_labels
from aver.demo.corpus import PROTOTYPES, expression_from_affect
from aver.faces import FaceDetector, crop_face
from aver.io.media import load_image
from aver.metrics import ccc
from aver.models import load_checkpoint


def ridge(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge regression fitted on (x, y), predicting x_test; features standardised on x."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a, b = (x - mu) / sd, (x_test - mu) / sd
    w = np.linalg.solve(a.T @ a + penalty * len(a) * np.eye(a.shape[1]), a.T @ (y - y.mean(0)))
    return b @ w + y.mean(0)


def best_ccc(x, y, x_test, y_test) -> tuple[float, float]:
    """(CCC, penalty) of the best of a few ridge penalties: the probe's ceiling, not a tuned model."""
    return max((float(ccc(y_test, ridge(x, y, x_test, p))), p)
               for p in (0.01, 0.1, 1.0, 10.0))


def nearest_class(expr: np.ndarray) -> np.ndarray:
    """The AffectNet class whose prototype (at the generator's mean intensity, 0.8) is nearest each row."""
    return np.linalg.norm(expr[:, None, :] - 0.8 * PROTOTYPES[None], axis=2).argmin(1)


def sessions(corpus: str, student, detector, fps: float) -> dict[str, dict]:
    out = {}
    for r in read_recola(os.path.join(corpus, "recola")).records:
        faces = face_features(r["video"], detector, student, fps=fps)
        labels = session_labels(r)  # [N, 2] arousal, valence on the 40 ms grid
        times = np.asarray(faces.times)
        k = np.minimum((times / STEP_S).astype(int), len(labels) - 1)
        present, emb, probs = faces.track(faces.primary()) if faces.primary() is not None else (
            np.zeros(len(times), bool), np.zeros((len(times), 1920), np.float32), np.zeros((len(times), 8)))
        out[r["name"]] = {"split": r["split"], "present": present, "emb": emb.astype(np.float32), "probs": probs,
                          "arousal": labels[k, 0], "valence": labels[k, 1]}
        print(f"{r['name']}: primary face in {present.mean():.0%} of {len(times)} frames", file=sys.stderr, flush=True)
    return out


def affectnet(corpus: str, student, split: str, limit: int) -> dict:
    m = read_affectnet(os.path.join(corpus, "affectnet", f"{split}.csv"))
    rows = m.records[:limit]
    crops = [crop_face(load_image(r["source"]), r["box"]) for r in rows]
    with torch.inference_mode():
        emb, probs = student_features(student, crops)
    return {"emb": emb, "probs": probs, "label": np.array([r["label"] for r in rows]),
            "valence": np.array([r["valence"] for r in rows]), "arousal": np.array([r["arousal"] for r in rows])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="a demo corpus (make_demo_corpus.py output, FEC fetched or not)")
    p.add_argument("--models", required=True, help="the folder holding student.pt")
    p.add_argument("--fps", type=float, default=5.0, help="frames sampled per second (the fusion's default, 5)")
    p.add_argument("--affectnet-rows", type=int, default=400, help="AffectNet rows of each split probed (400)")
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    student = load_checkpoint(os.path.join(a.models, "student.pt"))[0].eval()
    found = sessions(a.corpus, student, FaceDetector(), a.fps)
    rows = []
    for name, s in found.items():
        rows.append(f"| detection {name} | {s['present'].mean():.2f} |")

    def stack(split: str, key: str, centre: bool = False) -> np.ndarray:
        parts = []
        for s in found.values():
            if s["split"] != split:
                continue
            v = s[key][s["present"]]
            parts.append(centred(v) if centre and len(v) else v)
        return np.concatenate(parts)

    x, x_dev = stack("train", "emb", centre=True), stack("dev", "emb", centre=True)
    for dim in ("valence", "arousal"):
        c, pen = best_ccc(x, stack("train", dim), x_dev, stack("dev", dim))
        rows.append(f"| sessions: ridge CCC {dim}, centred embeddings (train -> dev) | {c:.2f} (penalty {pen:g}) |")
    drawn = np.concatenate([nearest_class(np.stack([expression_from_affect(v, ar) for v, ar in zip(
        s["valence"][s["present"]], s["arousal"][s["present"]])])) for s in found.values() if s["present"].any()])
    said = np.concatenate([s["probs"][s["present"]].argmax(1) for s in found.values() if s["present"].any()])
    rows.append(f"| sessions: student's class = drawn expression's nearest class | {(said == drawn).mean():.2f} |")
    share = lambda c: ", ".join(f"{AFFECTNET_CLASSES[k]} {np.mean(c == k):.2f}" for k in np.argsort(  # noqa: E731
        -np.bincount(c, minlength=8))[:3])
    rows.append(f"| sessions: student's classes (top 3) | {share(said)} |")
    rows.append(f"| sessions: drawn expressions' nearest classes (top 3) | {share(drawn)} |")
    tr, va = (affectnet(a.corpus, student, split, a.affectnet_rows) for split in ("training", "validation"))
    for dim in ("valence", "arousal"):
        c, pen = best_ccc(tr["emb"], tr[dim], va["emb"], va[dim])
        rows.append(f"| AffectNet: ridge CCC {dim} (training -> validation) | {c:.2f} (penalty {pen:g}) |")
    rows.append(f"| AffectNet: student's accuracy (validation) | {(va['probs'].argmax(1) == va['label']).mean():.2f} |")
    print("| probe | value |\n|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
