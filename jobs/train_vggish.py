#!/usr/bin/env python
"""Fine-tune the modified VGGish for one affect dimension (paper §3.2, Algorithm 2).

  python jobs/train_vggish.py --recola recola/ --dimension arousal --audioset vggish-audioset \\
      --output runs/ --name vggish_arousal
  ray job submit -- python jobs/train_vggish.py ... --num-workers 4 --use-gpu

Segments of --segment-frames log-mel frames (480 x 40 ms = 19.2 s) every --hop-frames; the
target is the mean gold label over the segment; loss 1 - CCC; Adam. Checkpoints every epoch,
resumes on rerun; the final model is OUTPUT/models/NAME.pt.
"""

from __future__ import annotations

import argparse
import sys

from aver.cli import add_train_args, train_kwargs
from aver.train_vggish import DIMENSIONS, VGGishTrainConfig, run


def parse_args(argv: list[str] | None = None) -> VGGishTrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recola", required=True, help="RECOLA root in the AVEC 2016 layout (local or fsspec URI)")
    p.add_argument("--dimension", choices=DIMENSIONS, required=True, help="affect dimension to predict")
    p.add_argument("--audioset", default=None, help="AudioSet VGGish weights: 'vggish-audioset' or a URI")
    p.add_argument("--segment-frames", type=int, default=480, help="log-mel frames per segment (default 480)")
    p.add_argument("--hop-frames", type=int, default=40, help="frames between segment starts (default 40)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout in the FC layers (default 0.2)")
    p.add_argument("--freeze-features", action="store_true",
                   help="keep the conv stack as it is and train the FC layers on its cached outputs")
    add_train_args(p, name="vggish", epochs=10, batch_size=8, lr=1e-4)
    a = p.parse_args(argv)
    if a.name == "vggish":
        a.name = f"vggish_{a.dimension}"
    return VGGishTrainConfig(**train_kwargs(a), recola=a.recola, dimension=a.dimension, audioset=a.audioset,
                             segment_frames=a.segment_frames, hop_frames=a.hop_frames, dropout=a.dropout,
                             freeze="features" if a.freeze_features else None)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
