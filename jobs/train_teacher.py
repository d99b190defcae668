#!/usr/bin/env python
"""Train a teacher (paper §3.1.1, Algorithm 1): FEC triplet loss + alpha * AffectNet cross-entropy.

  python jobs/train_teacher.py --affectnet affectnet/training.csv --fec fec/train.csv \\
      --facenet facenet-vggface2 --d-face 128 --output runs/ --name teacher128
  ray job submit -- python jobs/train_teacher.py ... --num-workers 4 --use-gpu

Checkpoints every epoch under OUTPUT/runs/NAME; a rerun resumes from the last one, and a rerun
of a finished run does nothing. The final model is OUTPUT/models/NAME.pt.
"""

from __future__ import annotations

import argparse
import sys

from aver.cli import add_train_args, train_kwargs
from aver.losses import FaceLossConfig
from aver.train_teacher import TeacherTrainConfig, run


def parse_args(argv: list[str] | None = None) -> TeacherTrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--affectnet", required=True, help="AffectNet training.csv")
    p.add_argument("--affectnet-images", default=None, help="AffectNet image folder (default: the CSV's folder)")
    p.add_argument("--fec", required=True, help="Google FEC training CSV (images fetched with jobs/fetch_fec.py)")
    p.add_argument("--fec-images", default=None, help="fetched FEC images (default: images/ beside the CSV)")
    p.add_argument("--d-face", type=int, default=128, choices=[128, 256], help="embedding width (default 128)")
    p.add_argument("--facenet", default=None, help="VGGFace2 trunk weights: registry name 'facenet-vggface2' or a URI")
    p.add_argument("--freeze-trunk", action="store_true",
                   help="train only the layers after the FaceNet trunk, whose outputs are cached")
    p.add_argument("--alpha", type=float, default=1.0, help="AffectNet loss weight alpha (default 1)")
    p.add_argument("--margin-one", type=float, default=0.1, help="one-class triplet margin (default 0.1)")
    p.add_argument("--margin-two", type=float, default=0.1, help="two-class triplet margin (default 0.1)")
    p.add_argument("--margin-three", type=float, default=0.2, help="three-class triplet margin (default 0.2)")
    add_train_args(p, name="teacher128", epochs=5, batch_size=32, lr=1e-3)
    a = p.parse_args(argv)
    loss = FaceLossConfig(margin_one_class=a.margin_one, margin_two_class=a.margin_two,
                          margin_three_class=a.margin_three, affectnet_weight=a.alpha)
    return TeacherTrainConfig(**train_kwargs(a), affectnet=a.affectnet, fec=a.fec,
                              affectnet_images=a.affectnet_images, fec_images=a.fec_images, d_face=a.d_face,
                              facenet=a.facenet, freeze="trunk" if a.freeze_trunk else None, loss=loss)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
