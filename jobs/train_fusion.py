#!/usr/bin/env python
"""Train the audio-visual fusion model (paper §3.3, Fig. 3) on RECOLA-layout sessions.

  python jobs/train_fusion.py --recola recola/ --student runs/models/student.pt \\
      --vggish-arousal runs/models/vggish_arousal.pt --vggish-valence runs/models/vggish_valence.pt \\
      --output runs/ --variants fused visual audio     # with Table 3's one-modality variants

Sessions are featurised once (student embeddings of the primary face at --fps; VGGish frame
features of both networks), cut into --window-s windows every --hop-s; loss 1 - CCC per
dimension; the variants train side by side on the same windows. Checkpoints every epoch, resumes
on rerun; final models OUTPUT/models/fusion.pt, fusion_visual.pt, fusion_audio.pt.
"""

from __future__ import annotations

import sys

from aver.cli import main
from aver.train.fusion import FusionTrainConfig, run

if __name__ == "__main__":
    sys.exit(main(FusionTrainConfig, run, __doc__))
