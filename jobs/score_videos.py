#!/usr/bin/env python
"""Label a video archive: arousal and valence over time (fusion), expression probabilities (student).

  python jobs/score_videos.py --input archive/ --output labels/ --model outputs/demo/models
  ray job submit -- python jobs/score_videos.py --input s3://b/archive/ --output s3://b/labels/ \\
      --model s3://b/models/ --gpus-per-actor 0.5

Writes OUTPUT/scores/ (one row per face track and --hop-s step: t_start_s, t_end_s, arousal,
valence, face_detected, modality, expression_probs), OUTPUT/summary/ (one row per input),
OUTPUT/status/ (one row per input) and OUTPUT/report/ (index.html, a timeline PNG per input, the
archive's circumplex). Inputs without a face are scored from audio, inputs without audio from
faces; the modality column says which. Rerunning skips inputs already complete.
"""

from __future__ import annotations

import argparse
import sys

from aver.cli import actor_kwargs, add_actor_args
from aver.media import MAX_DURATION_S
from aver.faces import FaceDetectorConfig
from aver.score import ScoreVideosConfig, run


def parse_args(argv: list[str] | None = None) -> ScoreVideosConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder, glob, manifest (.txt/.csv/.parquet with 'source') or file; local or fsspec URI")
    p.add_argument("--output", required=True, help="output folder (local or fsspec URI)")
    p.add_argument("--model", required=True, help="checkpoint folder (student.pt, vggish_*.pt, fusion*.pt), e.g. outputs/demo/models")
    p.add_argument("--fps", type=float, default=5.0, help="face frames sampled per second (default 5, as trained)")
    p.add_argument("--window-s", type=float, default=9.6, help="fusion window in seconds (default 9.6, as trained)")
    p.add_argument("--hop-s", type=float, default=0.4, help="one score row per track every HOP seconds (default 0.4)")
    p.add_argument("--all-faces", action="store_true", help="score every face track, not only the primary one")
    p.add_argument("--margin", type=float, default=0.2, help="context around the face box, fraction of its side (default 0.2)")
    p.add_argument("--min-prob", type=float, default=0.9, help="drop face detections below this probability (default 0.9)")
    p.add_argument("--detect-batch-size", type=int, default=32, help="frames per MTCNN batch (default 32)")
    p.add_argument("--batch-size", type=int, default=64, help="face crops per student batch, windows per fusion batch (default 64)")
    p.add_argument("--max-bytes", type=int, default=20 * 2**30, help="inputs larger than this get status too_large")
    p.add_argument("--max-duration-s", type=float, default=MAX_DURATION_S,
                   help=f"inputs that decode longer than this get status too_large (default {MAX_DURATION_S:.0f})")
    add_actor_args(p, what="scoring")
    a = p.parse_args(argv)
    detector = FaceDetectorConfig(margin=a.margin, min_prob=a.min_prob, batch_size=a.detect_batch_size)
    return ScoreVideosConfig(input=a.input, output=a.output, model=a.model, fps=a.fps, window_s=a.window_s,
                             hop_s=a.hop_s, all_faces=a.all_faces, detector=detector, batch_size=a.batch_size,
                             max_bytes=a.max_bytes, max_duration_s=a.max_duration_s, **actor_kwargs(a))


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
