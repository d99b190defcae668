#!/usr/bin/env python
"""Run two teachers over face crops and write 80-d distillation targets (paper §3.1.2).

  python jobs/distill.py --input out/faces/ --teachers t128.pt t256.pt --output out/
  ray job submit -- python jobs/distill.py --input s3://b/faces/ \\
      --teachers s3://b/models/teacher128.pt s3://b/models/teacher256.pt --output s3://b/distill/ \\
      --gpus-per-actor 0.5 --batch-size 512

Input: extract_faces output (faces/ parts), AffectNet / Google FEC CSVs, or face images.
Writes OUTPUT/targets/ (crop_id, target[80]) and OUTPUT/status/. Rerunning skips finished parts.
"""

from __future__ import annotations

import argparse
import sys

from aver.cli import actor_kwargs, add_actor_args
from aver.distill import DistillConfig, run


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="faces/ folder from extract_faces, an AffectNet training.csv/validation.csv, a Google FEC "
                        "CSV (images fetched beforehand), or face images (folder, glob, archive, manifest)")
    p.add_argument("--images-root", default=None,
                   help="AffectNet image folder (default: the CSV's folder) or fetched FEC images (default: images/ beside the CSV)")
    p.add_argument("--margin", type=float, default=0.2, help="context around manifest face boxes (default 0.2)")
    p.add_argument("--teachers", nargs=2, required=True, metavar="URI", help="two aver Teacher checkpoints (local or fsspec URI)")
    p.add_argument("--output", required=True, help="output folder (local or fsspec URI)")
    p.add_argument("--batch-size", type=int, default=256, help="crops per teacher forward pass (default 256)")
    p.add_argument("--images-per-unit", type=int, default=1024, help="images processed and written together (default 1024)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast or fp32; auto = bf16 on CUDA, fp32 on CPU")
    add_actor_args(p, what="teacher")
    a = p.parse_args(argv)
    return DistillConfig(input=a.input, teachers=tuple(a.teachers), output=a.output, batch_size=a.batch_size,
                         images_root=a.images_root, margin=a.margin,
                         images_per_unit=a.images_per_unit, precision=a.precision, **actor_kwargs(a))


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
