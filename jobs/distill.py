#!/usr/bin/env python
"""Run two teachers over face crops and write 80-d distillation targets (paper §3.1.2).

  python jobs/distill.py --input out/faces/ --teachers t128.pt t256.pt --output out/
  ray job submit -- python jobs/distill.py --input s3://b/faces/ \\
      --teachers s3://b/models/teacher128.pt s3://b/models/teacher256.pt --output s3://b/distill/ \\
      --gpus-per-actor 0.5 --batch-size 512

Input: one or more of extract_faces output (faces/ parts), AffectNet / Google FEC CSVs, or face
images (`--input A B C`: their units run together, into one OUTPUT).
Writes OUTPUT/targets/ (crop_id, target[80]) and OUTPUT/status/. Rerunning skips finished parts.
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.pipelines.distill import DistillConfig, run

if __name__ == "__main__":
    sys.exit(main(DistillConfig, run, __doc__))
