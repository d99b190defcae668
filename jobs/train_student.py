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

import sys

from aver.cli import main
from aver.train.face import StudentTrainConfig, run

if __name__ == "__main__":
    sys.exit(main(StudentTrainConfig, run, __doc__))
