#!/usr/bin/env python
"""Train the audio-visual fusion model (paper §3.3, Fig. 3) on RECOLA-layout sessions.

  python jobs/train_fusion.py --recola recola/ --student runs/models/student.pt \\
      --vggish-arousal runs/models/vggish_arousal.pt --vggish-valence runs/models/vggish_valence.pt \\
      --output runs/ --name fusion
  ... --modalities visual --name fusion_visual     # Table 3's visual-only variant

Sessions are featurised once (student embeddings of the primary face at --fps; VGGish frame
features of both networks), cut into --window-s windows every --hop-s; loss 1 - CCC per
dimension. Checkpoints every epoch, resumes on rerun; final model OUTPUT/models/NAME.pt.
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.train.fusion import FusionTrainConfig, run

if __name__ == "__main__":
    sys.exit(main(FusionTrainConfig, run, __doc__))
