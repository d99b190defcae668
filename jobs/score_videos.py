#!/usr/bin/env python
"""Label a video archive: arousal and valence over time (fusion), expression probabilities (student).

  python jobs/score_videos.py --input archive/ --output labels/ --model outputs/demo/models
  ray job submit -- python jobs/score_videos.py --input s3://b/archive/ --output s3://b/labels/ \\
      --model s3://b/models/ --gpus-per-actor 0.5

Writes OUTPUT/scores/ (per --hop-s step: one row per person on screen in it, track_id the person,
and one of the soundtrack, track_id null: t_start_s, t_end_s, arousal, valence, face_detected,
modality, expression_probs), OUTPUT/tracks/ (one row per person), OUTPUT/summary/ and
OUTPUT/status/ (one row per input) and OUTPUT/report/ (index.html, a timeline PNG per input, the
archive's circumplex). Inputs without a face are scored from audio, inputs without audio from
faces; the modality column says which. Rerunning skips inputs already complete.
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.pipelines.score import ScoreVideosConfig, run

if __name__ == "__main__":
    sys.exit(main(ScoreVideosConfig, run, __doc__))
