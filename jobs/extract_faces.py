#!/usr/bin/env python
"""Detect faces in videos or images and write 140x140 crops of the primary face track.

  python jobs/extract_faces.py --input videos/ --output out/            # embedded local Ray
  ray job submit -- python jobs/extract_faces.py --input s3://b/videos/ --output s3://b/faces/ \\
      --gpus-per-actor 0.25

Writes OUTPUT/faces/ (one row per sampled frame; nulls where no face) and OUTPUT/status/ (one
row per input). Rerunning skips inputs already complete.
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.pipelines.extract import ExtractFacesConfig, run

if __name__ == "__main__":
    sys.exit(main(ExtractFacesConfig, run, __doc__))
