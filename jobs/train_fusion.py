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

import argparse
import sys

from aver.cli import add_train_args, train_kwargs
from aver.train_fusion import FusionTrainConfig, run


def parse_args(argv: list[str] | None = None) -> FusionTrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recola", required=True, help="RECOLA root in the AVEC 2016 layout")
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--vggish-arousal", required=True, help="VGGish arousal checkpoint")
    p.add_argument("--vggish-valence", required=True, help="VGGish valence checkpoint")
    p.add_argument("--modalities", default="visual,audio", help="visual,audio (default), visual or audio")
    p.add_argument("--window-s", type=float, default=9.6, help="window length in seconds (default 9.6)")
    p.add_argument("--hop-s", type=float, default=0.4, help="seconds between training windows (default 0.4)")
    p.add_argument("--target-s", type=float, default=0.4, help="target = mean gold over the last seconds (default 0.4)")
    p.add_argument("--fps", type=float, default=5.0, help="face sampling rate (default 5)")
    p.add_argument("--featurizer-cpus", type=float, default=1.0, help="CPUs of the featurising actor (default 1)")
    add_train_args(p, name="fusion", epochs=20, batch_size=16, lr=1e-3)
    a = p.parse_args(argv)
    return FusionTrainConfig(**train_kwargs(a), recola=a.recola, student=a.student, vggish_arousal=a.vggish_arousal,
                             vggish_valence=a.vggish_valence, modalities=tuple(a.modalities.split(",")),
                             window_s=a.window_s, hop_s=a.hop_s, target_s=a.target_s, fps=a.fps,
                             featurizer_cpus=a.featurizer_cpus)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
