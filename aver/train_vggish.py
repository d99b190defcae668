"""train_vggish: Algorithm 2 — fine-tune the modified VGGish on RECOLA segments for one affect
dimension with the negative CCC (as 1 - CCC) and Adam, data-parallel on Ray Train."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aver.metrics import ccc
from aver.recola_data import recola_audio_dataset
from aver.training import (ShardBatches, TrainConfig, begin, ccc_epoch, epochs, fit, input_encoder, prepare_worker,
                           report_epoch, require_batches, to_device)

DIMENSIONS = ("arousal", "valence")


@dataclass
class VGGishTrainConfig(TrainConfig):
    recola: str = ""
    """RECOLA root (recordings_audio/, ratings_gold_standard/...)."""
    dimension: str = "arousal"
    """Which affect dimension this network predicts (the paper trains one network per dimension)."""
    audioset: str | None = None
    """AudioSet VGGish weights (registry name 'vggish-audioset' or a URI); None = random init."""
    segment_frames: int = 480
    """Log-mel frames per segment (480 x 40 ms = 19.2 s)."""
    hop_frames: int = 40
    """Frames between training segment starts."""
    dropout: float = 0.2
    """Dropout in the FC layers."""
    freeze: str | None = None
    """"features": keep the conv stack as it is and train the FC layers and the head on its
    outputs, computed once and cached (fast recipe). None trains everything."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.recola:
            raise ValueError("train_vggish needs --recola")
        if self.dimension not in DIMENSIONS:
            raise ValueError(f"dimension must be one of {DIMENSIONS}, got {self.dimension!r}")
        if self.segment_frames < 8 or self.hop_frames < 1:
            raise ValueError("segment_frames >= 8 and hop_frames >= 1")
        if self.batch_size < 2:
            raise ValueError("CCC needs batches of at least 2 segments")
        if self.freeze not in (None, "features"):
            raise ValueError(f"freeze must be None or 'features', got {self.freeze!r}")


def build_vggish(config: dict) -> torch.nn.Module:
    from aver.models import VGGishEmotion

    if config.get("audioset"):
        return VGGishEmotion.from_audioset(config["audioset"], dropout=config["dropout"],
                                           storage_options=config.get("storage_options") or None)
    return VGGishEmotion(dropout=config["dropout"])


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    freeze = config["freeze"]
    model, core, optimizer, start, history, device = prepare_worker(build_vggish, config, freeze=freeze,
                                                                    optimizer=torch.optim.Adam)
    dim = config["dimension"]

    def to_input(mel):  # [B,T,128] log-mel -> [B,1,T,128]
        return torch.as_tensor(mel).float().unsqueeze(1).contiguous(memory_format=torch.channels_last)

    encode, store = input_encoder(config, core, freeze, to_input, device)
    data = ShardBatches(ray.train.get_dataset_shard("train"), ("mel",), encode, config["batch_size"],
                        cache=bool(freeze), seed=config["seed"], drop_last=True, store=store)

    def predict(batch):
        pred = model(to_device(batch["mel"], device), after=freeze).prediction
        return pred, to_device(torch.as_tensor(batch[dim]).float(), device)

    for epoch in epochs(config, start, optimizer):
        loss, preds, targets = ccc_epoch(model, optimizer, data.epoch(epoch), predict, config, epoch)
        history = report_epoch(epoch, {"loss": loss, "ccc": ccc(targets, preds)}, model, optimizer, history)


def run(cfg: VGGishTrainConfig) -> list[dict] | None:
    """Train (or resume) one VGGish network; returns the metric history, None when already finished."""
    if not begin(cfg, "train_vggish"):
        return None
    train = recola_audio_dataset(cfg.recola, "train", segment_frames=cfg.segment_frames, hop_frames=cfg.hop_frames,
                                 storage_options=cfg.storage_options or None)
    train = train.materialize()
    require_batches(train.count(), cfg, f"{cfg.segment_frames}-frame training segments")
    loop = {k: getattr(cfg, k) for k in ("dimension", "audioset", "dropout", "freeze")}
    history = fit(train_loop_per_worker, cfg, {"train": train.select_columns(["mel", "arousal", "valence"])}, loop,
                  lambda c: build_vggish({**c, "audioset": None}))
    print(f"train_vggish: wrote {cfg.model_uri}", flush=True)
    return history
