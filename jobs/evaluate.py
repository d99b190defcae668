#!/usr/bin/env python
"""Evaluate trained models with the paper's protocols (Tables 1-5).

  python jobs/evaluate.py --models runs/models --data corpus/ --output runs/eval

AffectNet: class-balanced logistic regression on student embeddings (train -> validation split);
FEC: student triplet accuracy on the test triplets; RECOLA: CCC of arousal and valence on the dev
sessions for the fused / visual-only / audio-only fusion models present in --models.
Writes OUTPUT/metrics.json (keys affectnet_accuracy, fec_triplet_accuracy,
ccc.{arousal,valence}.{audio,visual,fused}) and OUTPUT/metrics.md beside the paper's figures.
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.pipelines.evaluate import EvaluateConfig, run

if __name__ == "__main__":
    sys.exit(main(EvaluateConfig, run, __doc__))
