"""train_vggish: Algorithm 2 — fine-tune the modified VGGish on RECOLA segments, one network per
affect dimension (both side by side on the same batches when asked), with the negative CCC (as
1 - CCC) and Adam, data-parallel on Ray Train."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aver.data.recola import recola_audio_dataset
from aver.metrics import ccc
from aver.models import VGGishConfig, VGGishEmotion, to_device
from aver.train.batches import ShardBatches, cache_bytes, input_encoder
from aver.train.harness import TrainConfig, begin, ccc_epoch, epochs, fit, prepare_worker, report_epoch, require_batches

DIMENSIONS = ("arousal", "valence")


@dataclass
class VGGishTrainConfig(TrainConfig):
    name: str = ""
    """Run name: checkpoints under OUTPUT/runs/NAME (default vggish_DIMENSION, or
    vggish_arousal+vggish_valence); one network is published as OUTPUT/models/NAME.pt, two as
    vggish_DIMENSION.pt each."""
    epochs: int = 10
    """Passes over the training segments."""
    batch_size: int = 8
    """Segments per step per worker (CCC needs at least 2)."""
    lr: float = 1e-4
    """Learning rate (Adam)."""
    recola: str = ""
    """RECOLA root in the AVEC 2016 layout: recordings_audio/*.wav, recordings_video/*.mp4,
    ratings_gold_standard/{arousal,valence}/*.arff (sessions train_N, dev_N)."""
    dimension: tuple[str, ...] = field(default=("arousal",), metadata={"choices": DIMENSIONS})
    """The affect dimensions: one network each (as the paper), trained side by side on the same
    segments when both are given."""
    audioset: str | None = None
    """AudioSet VGGish weights (registry name 'vggish-audioset' or a URI); None = random init."""
    segment_frames: int = 480
    """Log-mel frames per segment (480 x 40 ms = 19.2 s)."""
    hop_frames: int = 40
    """Frames between training segment starts."""
    dropout: float = VGGishConfig.dropout
    """Dropout in the FC layers."""
    freeze: str | None = field(default=None, metadata={"choices": VGGishEmotion.stages})
    """"features": keep the conv stack as it is and train the FC layers and the head on its
    outputs, computed once and cached (fast recipe). None trains everything."""

    weight_fields = ("audioset",)
    path_fields = ("output", "recola")

    def __post_init__(self) -> None:
        self.dimension = (self.dimension,) if isinstance(self.dimension, str) else tuple(self.dimension)
        if not self.dimension or any(d not in DIMENSIONS for d in self.dimension) \
                or len(set(self.dimension)) < len(self.dimension):
            raise ValueError(f"dimension must be distinct ones of {DIMENSIONS}, got {self.dimension!r}")
        super().__post_init__()
        if not self.recola:
            raise ValueError("train_vggish needs --recola")
        if self.segment_frames < 8 or self.hop_frames < 1:
            raise ValueError("segment_frames >= 8 and hop_frames >= 1")
        if self.batch_size < 2:
            raise ValueError("CCC needs batches of at least 2 segments")
        if self.freeze is not None and self.freeze not in VGGishEmotion.stages:
            raise ValueError(f"freeze must be None or one of {VGGishEmotion.stages}, got {self.freeze!r}")

    def default_variants(self) -> dict[str, str]:
        return {f"vggish_{d}": d for d in self.dimension}

    def build_model(self, variant: str | None = None, pretrained: bool = True) -> VGGishEmotion:
        if pretrained and self.audioset:
            return VGGishEmotion.from_audioset(self.audioset, dropout=self.dropout,
                                               storage_options=self.storage_options or None)
        return VGGishEmotion(dropout=self.dropout)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg: VGGishTrainConfig = config["cfg"]
    model, core, optimizer, start, history, device = prepare_worker(cfg, freeze=cfg.freeze, optimizer=torch.optim.Adam)
    # the networks' frozen conv stacks are equal (build_variants): one cache serves both
    encode, store = input_encoder(cfg, core.first, cfg.freeze, VGGishEmotion.preprocess, device)
    data = ShardBatches(ray.train.get_dataset_shard("train"), ("mel",), encode, cfg.batch_size,
                        cache=bool(cfg.freeze), seed=cfg.seed, drop_last=True, store=store,
                        cache_bytes=cache_bytes(cfg))
    dimension = cfg.named_variants()

    def predict(batch):
        out = model(core.same(to_device(batch["mel"], device)), after=cfg.freeze)
        return {name: (o.prediction, to_device(torch.as_tensor(batch[dimension[name]]).float(), device))
                for name, o in out.items()}

    for epoch in epochs(cfg, start, optimizer):
        results = ccc_epoch(model, optimizer, data.epoch(epoch), predict, cfg, epoch, total=data.steps)
        metrics = {name: {"loss": loss, "ccc": ccc(targets, preds)} for name, (loss, preds, targets) in results.items()}
        history = report_epoch(epoch, metrics, model, optimizer, history, cfg, shared={"steps": data.pass_length})


def run(cfg: VGGishTrainConfig) -> dict[str, list[dict]] | None:
    """Train (or resume) the VGGish networks; returns ``{model name: metric history}``, None when
    already finished."""
    if not begin(cfg, "train_vggish"):
        return None
    train = recola_audio_dataset(cfg.recola, "train", segment_frames=cfg.segment_frames, hop_frames=cfg.hop_frames,
                                 storage_options=cfg.storage_options or None)
    train = train.materialize()
    require_batches(train.count(), cfg, f"{cfg.segment_frames}-frame training segments")
    return fit(train_loop_per_worker, cfg, {"train": train.select_columns(["mel", "arousal", "valence"])},
               "train_vggish")
