#!/usr/bin/env python
"""Train a teacher (paper §3.1.1, Algorithm 1): FEC triplet loss + alpha * AffectNet cross-entropy.

  python jobs/train_teacher.py --affectnet affectnet/training.csv --fec fec/train.csv \\
      --facenet facenet-vggface2 --d-face 128 256 --output runs/
  ray job submit -- python jobs/train_teacher.py ... --num-workers 4 --use-gpu

Several --d-face widths train side by side on the same batches (and the same cached trunk).
Checkpoints every epoch under OUTPUT/runs/NAME; a rerun resumes from the last one, and a rerun
of a finished run does nothing. The final models are OUTPUT/models/teacherD.pt (one width:
OUTPUT/models/NAME.pt).
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.train.face import TeacherTrainConfig, run

if __name__ == "__main__":
    sys.exit(main(TeacherTrainConfig, run, __doc__))
