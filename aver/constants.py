"""Facts of the method that several layers use, each stated once."""

CROP_SIZE = 140
"""Side of the square face crops every face network sees (paper §3.1)."""

DISTILL_DIM = 80
"""Width of a distillation target: [t1.fec, t1.affectnet, t2.fec, t2.affectnet] of the two teachers
(32 + 8 + 32 + 8), what the student's distill head learns."""

LABEL_STEP_S = 0.04
"""RECOLA's gold-label frame step, also the log-mel window and hop (40 ms)."""

SAMPLE_RATE = 16000
"""Audio sample rate of the VGGish front end."""

AUDIO_STEP_S = 8 * LABEL_STEP_S
"""Time step of VGGish frame features: one per 8 log-mel frames (0.32 s)."""

AFFECTNET_CLASSES: tuple[str, ...] = (
    "Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt",
)
"""AffectNet expression classes 0-7, in label order (8-10 are not used)."""

FEC_TRIPLET_TYPES: tuple[str, ...] = ("ONE_CLASS_TRIPLET", "TWO_CLASS_TRIPLET", "THREE_CLASS_TRIPLET")
"""Google FEC triplet types; a triplet's type code is its index here."""
