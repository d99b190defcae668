"""train_fusion: the audio-visual fusion model (paper §3.3, Fig. 3) on RECOLA-layout sessions.

Sessions are featurised once (primary-face crops -> student embeddings at ``fps``; audio ->
VGGish frame features of the arousal and valence networks), cut into windows of ``window_s`` every
``hop_s``, and the model learns the gold (arousal, valence) of each window's last ``target_s``
with 1 - CCC per dimension. ``variants`` picks the fused model and the visual-only / audio-only
ones (Table 3), trained side by side on the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aver.data.features import AUDIO_DIM, VISUAL_DIM
from aver.data.recola import SessionWindows, count_windows, session_windows
from aver.io.parts import join
from aver.metrics import ccc
from aver.models import FusionConfig, FusionModel, to_device
from aver.train.batches import ShardBatches, cache_bytes
from aver.train.harness import TrainConfig, begin, ccc_epoch, epochs, fit, prepare_worker, report_epoch, require_batches


VARIANTS = {"fused": ("fusion", ("visual", "audio")), "visual": ("fusion_visual", ("visual",)),
            "audio": ("fusion_audio", ("audio",))}
"""Table 3's variants: their published names and inputs."""


@dataclass
class FusionTrainConfig(TrainConfig):
    path_fields = ("output", "recola", "student", "vggish_arousal", "vggish_valence", "features_cache")

    name: str = ""
    """Run name: checkpoints under OUTPUT/runs/NAME (default the variants' model names joined by
    +); one variant is published as OUTPUT/models/NAME.pt, several under their own names
    (fusion, fusion_visual, fusion_audio)."""
    epochs: int = 20
    """Passes over the training windows."""
    batch_size: int = 16
    """Windows per step per worker (CCC needs at least 2)."""
    recola: str = ""
    """RECOLA root in the AVEC 2016 layout: recordings_audio/*.wav, recordings_video/*.mp4,
    ratings_gold_standard/{arousal,valence}/*.arff (sessions train_N, dev_N)."""
    student: str = ""
    """Student checkpoint (train_student output)."""
    vggish_arousal: str = ""
    """VGGish arousal checkpoint (train_vggish output)."""
    vggish_valence: str = ""
    """VGGish valence checkpoint."""
    variants: tuple[str, ...] = field(default=("fused",), metadata={"choices": tuple(VARIANTS)})
    """Models trained side by side on the same windows: fused (visual and audio, published as
    fusion), visual (fusion_visual), audio (fusion_audio)."""
    window_s: float = SessionWindows.window_s
    """Window length fed to the fusion model."""
    hop_s: float = SessionWindows.hop_s
    """Training windows start every hop_s."""
    target_s: float = SessionWindows.target_s
    """The target is the mean gold label over the window's last target_s."""
    fps: float = SessionWindows.fps
    """Face sampling rate for visual features."""
    featurizers: int = SessionWindows.featurizers
    """Most featurising actors (each featurises one session at a time); 0: one per session at most."""
    featurizer_cpus: float = SessionWindows.featurizer_cpus
    """CPUs per featurising actor (student, VGGish and MTCNN together)."""
    featurizer_gpus: float = SessionWindows.featurizer_gpus
    """GPU share per featurising actor; 0 runs on CPU."""
    visual_dropout: float = 0.3
    """Share of the fused model's training windows whose visual input is blanked (as when no face
    is found): it learns to lean on the voice where the face adds nothing, instead of fitting the
    training faces (decisions.md). Ignored by the one-modality variants."""
    features_cache: str | None = None
    """Folder of per-session feature timelines, a subfolder per set of models and fps (their content
    hashes): every run with the same ones (fused / visual-only / audio-only) featurises once. Default OUTPUT/features."""

    def __post_init__(self) -> None:
        self.variants = (self.variants,) if isinstance(self.variants, str) else tuple(self.variants)
        if not self.variants or any(v not in VARIANTS for v in self.variants) or \
                len(set(self.variants)) < len(self.variants):
            raise ValueError(f"variants must be distinct ones of {tuple(VARIANTS)}, got {self.variants!r}")
        super().__post_init__()
        if not self.recola or not self.student or not self.vggish_arousal or not self.vggish_valence:
            raise ValueError("train_fusion needs --recola, --student, --vggish-arousal and --vggish-valence")
        self.windows()  # checks the windowing
        if self.batch_size < 2:
            raise ValueError("CCC needs batches of at least 2 windows")
        if not 0 <= self.visual_dropout < 1:
            raise ValueError("visual_dropout must be in [0, 1)")

    def windows(self) -> SessionWindows:
        """How the sessions are featurised and windowed."""
        return SessionWindows(recola=self.recola, student=self.student, vggish_arousal=self.vggish_arousal,
                              vggish_valence=self.vggish_valence, window_s=self.window_s, hop_s=self.hop_s,
                              target_s=self.target_s, fps=self.fps, featurizers=self.featurizers,
                              featurizer_cpus=self.featurizer_cpus, featurizer_gpus=self.featurizer_gpus,
                              features_cache=self.features_cache, storage_options=self.storage_options)

    def default_variants(self) -> dict[str, tuple[str, ...]]:
        """{model name: its inputs}."""
        return dict(VARIANTS[v] for v in self.variants)

    def build_model(self, variant: tuple[str, ...] | None = None, pretrained: bool = True) -> FusionModel:
        modalities = variant or VARIANTS[self.variants[0]][1]
        return FusionModel(FusionConfig(visual_dim=VISUAL_DIM, audio_dim=AUDIO_DIM, modalities=modalities))


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg: FusionTrainConfig = config["cfg"]
    model, _, optimizer, start, history, device = prepare_worker(cfg, optimizer=torch.optim.Adam)
    inputs = cfg.named_variants()

    def predict(batch):
        visual, audio = to_device(batch["visual"], device), to_device(batch["audio"], device)
        target = to_device(torch.as_tensor(batch["target"]), device)
        args = {}
        for name, modalities in inputs.items():
            v = visual if "visual" in modalities else None
            if len(modalities) == 2 and model.training and cfg.visual_dropout:
                v = v * (torch.rand(len(v), 1, 1, device=device) >= cfg.visual_dropout).to(v.dtype)
            args[name] = (v, audio if "audio" in modalities else None)
        return {name: (pred, target) for name, pred in model(args).items()}

    # Windows are small and reread every epoch: keep this worker's shard in memory (float16).
    windows = ShardBatches(ray.train.get_dataset_shard("train"), ("visual", "audio"), torch.as_tensor, cfg.batch_size,
                           cache=True, seed=cfg.seed, drop_last=True,
                           cache_bytes=cache_bytes(cfg))
    for epoch in epochs(cfg, start, optimizer):
        results = ccc_epoch(model, optimizer, windows.epoch(epoch), predict, cfg, epoch, total=windows.steps)
        metrics = {name: {"loss": loss, "ccc_arousal": ccc(t[:, 0], p[:, 0]), "ccc_valence": ccc(t[:, 1], p[:, 1])}
                   for name, (loss, p, t) in results.items()}
        history = report_epoch(epoch, metrics, model, optimizer, history, cfg, shared={"steps": windows.pass_length})


def run(cfg: FusionTrainConfig) -> dict[str, list[dict]] | None:
    """Featurise the train sessions and train (or resume) the fusion variants; returns
    ``{model name: metric history}``, None when already finished."""
    if not begin(cfg, "train_fusion"):
        return None
    n = count_windows(cfg.windows(), "train")
    require_batches(n, cfg, f"{cfg.window_s} s training windows")  # before featurising anything
    windows = cfg.windows()
    windows.features_cache = join(cfg.features_cache or join(cfg.output, "features"), windows.features_key())
    train = session_windows(windows, "train").select_columns(["visual", "audio", "target"])
    print(f"train_fusion: {n} training windows of {cfg.window_s} s", flush=True)
    return fit(train_loop_per_worker, cfg, {"train": train}, "train_fusion")
