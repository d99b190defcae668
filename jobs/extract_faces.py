#!/usr/bin/env python
"""Detect faces in videos or images and write 140x140 crops of the primary face track.

  python jobs/extract_faces.py --input videos/ --output out/            # embedded local Ray
  ray job submit -- python jobs/extract_faces.py --input s3://b/videos/ --output s3://b/faces/ \\
      --gpus-per-actor 0.25

Writes OUTPUT/faces/ (one row per sampled frame; nulls where no face) and OUTPUT/status/ (one
row per input). Rerunning skips inputs already complete.
"""

from __future__ import annotations

import argparse
import sys

from aver.cli import actor_kwargs, add_actor_args
from aver.media import MAX_DURATION_S
from aver.extract import ExtractFacesConfig, run
from aver.faces import FaceDetectorConfig


def parse_args(argv: list[str] | None = None) -> ExtractFacesConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder, glob, manifest (.txt/.csv/.parquet with 'source') or file; local or fsspec URI")
    p.add_argument("--output", required=True, help="output folder (local or fsspec URI, e.g. s3://bucket/run/)")
    p.add_argument("--fps", type=float, default=5.0, help="frames sampled per second of video (default 5)")
    p.add_argument("--image-size", type=int, default=140, help="side of the square face crop in pixels (default 140)")
    p.add_argument("--margin", type=float, default=0.2, help="context around the face box, fraction of its side (default 0.2)")
    p.add_argument("--min-face-size", type=int, default=20, help="smallest face searched, in detection pixels (default 20)")
    p.add_argument("--min-prob", type=float, default=0.9, help="drop detections below this probability (default 0.9)")
    p.add_argument("--detect-max-side", type=int, default=640, help="downscale frames to this longer side for detection (default 640)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per MTCNN batch (default 32; raise on GPUs)")
    p.add_argument("--images-per-unit", type=int, default=256, help="images processed and written together (default 256)")
    p.add_argument("--max-bytes", type=int, default=20 * 2**30, help="inputs larger than this get status too_large")
    p.add_argument("--max-duration-s", type=float, default=MAX_DURATION_S,
                   help=f"inputs that decode longer than this get status too_large (default {MAX_DURATION_S:.0f})")
    add_actor_args(p, what="detector")
    a = p.parse_args(argv)
    detector = FaceDetectorConfig(image_size=a.image_size, margin=a.margin, min_face_size=a.min_face_size,
                                  min_prob=a.min_prob, detect_max_side=a.detect_max_side, batch_size=a.batch_size)
    return ExtractFacesConfig(input=a.input, output=a.output, fps=a.fps, detector=detector,
                              images_per_unit=a.images_per_unit, max_bytes=a.max_bytes,
                              max_duration_s=a.max_duration_s, **actor_kwargs(a))


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
