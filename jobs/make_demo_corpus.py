#!/usr/bin/env python
"""Write the offline demo corpus (SPEC §7) in the real datasets' layouts.

  python jobs/make_demo_corpus.py --output outputs/demo/corpus --seed 0 --size medium

OUTPUT/affectnet/   training.csv, validation.csv, Manually_Annotated_Images/...
OUTPUT/fec/         faceexp-comparison-data-{train,test}-public.csv (file:// URLs), source/
OUTPUT/recola/      recordings_audio/*.wav, recordings_video/*.mp4, ratings_gold_standard/{arousal,valence}/*.arff
OUTPUT/unlabeled/   face images without labels (the PowderFaces role)
OUTPUT/archive/     videos for score_videos: speech+face, face only, audio only, no face, broken

Faces are drawn procedurally; the expression carries the AffectNet class, FEC similarity and the
continuous valence/arousal; the voice's pitch, energy and timbre carry arousal and valence.
Identity, pose, scale, lighting and noise vary independently. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import sys

from aver.demo.corpus import SIZES, write_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the corpus into (local path)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same corpus")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="small (tests) or medium (demo)")
    a = p.parse_args(argv)
    counts = write_corpus(a.output, seed=a.seed, size=a.size)
    print("make_demo_corpus: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
