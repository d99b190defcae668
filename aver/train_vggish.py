"""train_vggish: Algorithm 2 — fine-tune the modified VGGish on RECOLA segments for one affect
dimension with the negative CCC (as 1 - CCC) and Adam, data-parallel on Ray Train."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aver.metrics import ccc
from aver.recola_data import recola_audio_dataset
from aver.training import (TrainConfig, begin, ccc_epoch, fit, report_epoch, require_batches, restore, start_worker,
                           to_device)

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


def build_vggish(config: dict) -> torch.nn.Module:
    from aver.models import VGGishEmotion

    if config.get("audioset"):
        return VGGishEmotion.from_audioset(config["audioset"], dropout=config["dropout"],
                                           storage_options=config.get("storage_options") or None)
    return VGGishEmotion(dropout=config["dropout"])


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    start_worker(config)
    model = ray.train.torch.prepare_model(build_vggish(config).to(memory_format=torch.channels_last))
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    start, history = restore(model, optimizer)
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    dim = config["dimension"]
    bs = config["batch_size"]

    def predict(batch):
        mel = batch["mel"].unsqueeze(1).contiguous(memory_format=torch.channels_last)
        return model(to_device(mel, device)).prediction, to_device(batch[dim].float(), device)

    for epoch in range(start, config["epochs"]):
        batches = shard.iter_torch_batches(batch_size=bs, local_shuffle_buffer_size=4 * bs, drop_last=True)
        loss, preds, targets = ccc_epoch(model, optimizer, batches, predict, config, epoch)
        history = report_epoch(epoch, {"loss": loss, "ccc": ccc(targets, preds)}, model, optimizer, history)


def run(cfg: VGGishTrainConfig) -> list[dict] | None:
    """Train (or resume) one VGGish network; returns the metric history, None when already finished."""
    if not begin(cfg, "train_vggish"):
        return None
    train = recola_audio_dataset(cfg.recola, "train", segment_frames=cfg.segment_frames, hop_frames=cfg.hop_frames,
                                 storage_options=cfg.storage_options or None)
    train = train.materialize()
    require_batches(train.count(), cfg, f"{cfg.segment_frames}-frame training segments")
    loop = {k: getattr(cfg, k) for k in ("dimension", "audioset", "dropout")}
    history = fit(train_loop_per_worker, cfg, {"train": train.select_columns(["mel", "arousal", "valence"])}, loop,
                  lambda c: build_vggish({**c, "audioset": None}))
    print(f"train_vggish: wrote {cfg.model_uri}", flush=True)
    return history
