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

import argparse
import json
import sys

from aver.evaluate import EvaluateConfig, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="folder with student.pt, fusion*.pt, vggish_*.pt")
    p.add_argument("--data", required=True, help="corpus root with affectnet/, fec/, recola/")
    p.add_argument("--output", required=True, help="folder for metrics.json and metrics.md")
    p.add_argument("--recola-split", default="dev", help="RECOLA sessions to score (default dev)")
    p.add_argument("--window-s", type=float, default=9.6, help="fusion window as trained (default 9.6)")
    p.add_argument("--fps", type=float, default=5.0, help="face sampling rate as trained (default 5)")
    p.add_argument("--prefix-cache", default=None,
                   help="the students' training --output: reuse the frozen-prefix outputs cached there")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    a = p.parse_args(argv)
    run(EvaluateConfig(models=a.models, data=a.data, output=a.output, recola_split=a.recola_split,
                       window_s=a.window_s, fps=a.fps, prefix_cache=a.prefix_cache,
                       storage_options=a.storage_options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
