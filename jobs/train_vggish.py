#!/usr/bin/env python
"""Fine-tune the modified VGGish, one network per affect dimension (paper §3.2, Algorithm 2).

  python jobs/train_vggish.py --recola recola/ --dimension arousal valence --audioset vggish-audioset \\
      --output runs/
  ray job submit -- python jobs/train_vggish.py ... --num-workers 4 --use-gpu

Segments of --segment-frames log-mel frames (480 x 40 ms = 19.2 s) every --hop-frames; the
target is the mean gold label over the segment; loss 1 - CCC; Adam. Both dimensions' networks
train side by side on the same segments. Checkpoints every epoch, resumes on rerun; the final
models are OUTPUT/models/vggish_DIMENSION.pt (one dimension: OUTPUT/models/NAME.pt).
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.train.vggish import VGGishTrainConfig, run

if __name__ == "__main__":
    sys.exit(main(VGGishTrainConfig, run, __doc__))
