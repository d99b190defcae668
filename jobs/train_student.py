#!/usr/bin/env python
"""Train the distilled DenseNet201 student (paper §3.1.2).

  python jobs/distill.py --input affectnet/training.csv --teachers t128.pt t256.pt --output distill/
  python jobs/distill.py --input fec/faceexp-comparison-data-train-public.csv --teachers ... --output distill/
  python jobs/train_student.py --affectnet affectnet/training.csv --fec fec/train.csv \\
      --targets distill/ --unlabeled powderfaces/ --imagenet densenet201-imagenet --output runs/

Loss: RKD(80-d head, teacher targets) + FEC triplet + alpha * AffectNet CE; unlabeled batches add
RKD only. Without --targets the student trains without distillation (the paper's ablation).
Checkpoints every epoch, resumes on rerun; final model OUTPUT/models/NAME.pt.
"""

from __future__ import annotations

import argparse
import sys

from aver.cli import add_train_args, train_kwargs
from aver.losses import FaceLossConfig
from aver.train_student import StudentTrainConfig, run


def parse_args(argv: list[str] | None = None) -> StudentTrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--affectnet", required=True, help="AffectNet training.csv")
    p.add_argument("--affectnet-images", default=None, help="AffectNet image folder (default: the CSV's folder)")
    p.add_argument("--fec", required=True, help="Google FEC training CSV (images fetched)")
    p.add_argument("--fec-images", default=None, help="fetched FEC images (default: images/ beside the CSV)")
    p.add_argument("--targets", default=None, help="distill.py output folder; omit to train without distillation")
    p.add_argument("--unlabeled", default=None, help="unlabeled face images (distilled into the same --targets)")
    p.add_argument("--imagenet", default=None, help="DenseNet201 ImageNet weights: 'densenet201-imagenet' or a URI")
    p.add_argument("--freeze", default=None, metavar="STAGE",
                   help="keep the backbone frozen up to this stage (e.g. transition3) and cache its outputs")
    p.add_argument("--alpha", type=float, default=1.0, help="AffectNet loss weight (default 1)")
    p.add_argument("--rkd-distance", type=float, default=1.0, help="RKD distance-term weight (default 1)")
    p.add_argument("--rkd-angle", type=float, default=2.0, help="RKD angle-term weight (default 2)")
    add_train_args(p, name="student", epochs=5, batch_size=16, lr=1e-3)
    a = p.parse_args(argv)
    loss = FaceLossConfig(affectnet_weight=a.alpha, rkd_distance_weight=a.rkd_distance, rkd_angle_weight=a.rkd_angle)
    return StudentTrainConfig(**train_kwargs(a), affectnet=a.affectnet, fec=a.fec, targets=a.targets,
                              unlabeled=a.unlabeled, affectnet_images=a.affectnet_images, fec_images=a.fec_images,
                              imagenet=a.imagenet, freeze=a.freeze, loss=loss)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
