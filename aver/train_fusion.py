"""train_fusion: the audio-visual fusion model (paper §3.3, Fig. 3) on RECOLA-layout sessions.

Sessions are featurised once (primary-face crops -> student embeddings at ``fps``; audio ->
VGGish frame features of the arousal and valence networks), cut into windows of ``window_s`` every
``hop_s``, and the model learns the gold (arousal, valence) of each window's last ``target_s``
with 1 - CCC per dimension. ``modalities`` trains the visual-only / audio-only variants (Table 3).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from aver.features import AUDIO_STEP_S, audio_timeline, take, visual_timeline, window_slices
from aver.metrics import ccc
from aver.models.fusion import MODALITIES
from aver.outputs import join
from aver.storage import exists, read_bytes, write_bytes_atomic
from aver.training import (ShardBatches, TrainConfig, begin, ccc_epoch, epochs, fit, prepare_worker, report_epoch,
                           require_batches, to_device)

STEP_S = 0.04


@dataclass
class FusionTrainConfig(TrainConfig):
    recola: str = ""
    """RECOLA root (recordings_video/, recordings_audio/, ratings_gold_standard/)."""
    student: str = ""
    """Student checkpoint (train_student output)."""
    vggish_arousal: str = ""
    """VGGish arousal checkpoint (train_vggish output)."""
    vggish_valence: str = ""
    """VGGish valence checkpoint."""
    modalities: tuple[str, ...] = MODALITIES
    """Inputs used: visual and audio (fused), or one of them."""
    window_s: float = 9.6
    """Window length fed to the fusion model."""
    hop_s: float = 0.4
    """Training windows start every hop_s."""
    target_s: float = 0.4
    """The target is the mean gold label over the window's last target_s."""
    fps: float = 5.0
    """Face sampling rate for visual features."""
    featurizer_cpus: float = 1.0
    """CPUs of the featurising actor (student, VGGish and MTCNN together)."""
    features_cache: str | None = None
    """Folder for per-session feature timelines, reused by every run with the same models and fps
    (the fused / visual-only / audio-only runs featurise once). Default OUTPUT/features."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.modalities = tuple(self.modalities)
        if not self.recola or not self.student or not self.vggish_arousal or not self.vggish_valence:
            raise ValueError("train_fusion needs --recola, --student, --vggish-arousal and --vggish-valence")
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}")
        if not 0 < self.target_s <= self.window_s or self.hop_s <= 0 or self.fps <= 0:
            raise ValueError("need 0 < target_s <= window_s, hop_s > 0, fps > 0")
        if self.batch_size < 2:
            raise ValueError("CCC needs batches of at least 2 windows")


def window_shape(window_s: float, fps: float) -> tuple[int, int]:
    """(visual steps, audio steps) of one window."""
    return max(1, round(window_s * fps)), max(1, round(window_s / AUDIO_STEP_S))


class SessionFeaturizer:
    """Ray Data actor: session record -> fusion windows (visual, audio, target)."""

    def __init__(self, cfg: dict) -> None:
        from aver.units import actor_threads

        actor_threads(cfg.get("featurizer_cpus", 1.0))
        self.cfg = cfg
        self.models: dict | None = None  # loaded on the first session not in the cache

    def _load(self) -> dict:
        from aver.extract import ExtractFacesConfig
        from aver.faces import FaceDetector
        from aver.models import load_checkpoint

        if self.models is None:
            so = self.cfg.get("storage_options") or None
            extract = ExtractFacesConfig(input="", output="", fps=self.cfg["fps"], storage_options=so or {})
            self.models = {
                "student": load_checkpoint(self.cfg["student"], storage_options=so)[0],
                "vggish": [load_checkpoint(self.cfg[k], storage_options=so)[0]
                           for k in ("vggish_arousal", "vggish_valence")],
                "extract": extract, "detector": FaceDetector(extract.detector, device="cpu")}
        return self.models

    def _timelines(self, record: dict) -> tuple:
        """(visual times, features | None, audio times, features | None) of a session, from the
        cache when an earlier run with the same models computed them."""
        from aver.extract import process_video
        from aver.media import InputItem, MediaError, read_audio

        so = self.cfg.get("storage_options") or None
        cache = self.cfg.get("features_cache")
        uri = join(cache, f"{record['name']}.npz") if cache else None
        if uri and exists(uri, so):
            with np.load(io.BytesIO(read_bytes(uri, so)), allow_pickle=False) as z:
                return tuple(z[k] if z[k].size or k.endswith("times") else None
                             for k in ("visual_times", "visual", "audio_times", "audio"))
        m = self._load()
        vis = aud = None
        if record.get("video"):
            faces, _ = process_video(InputItem(record["video"], record["name"], "video"), m["detector"], m["extract"])
            if faces.num_rows:
                vis = visual_timeline(faces, m["student"])
        try:
            aud = audio_timeline(read_audio(record["audio"] or record["video"]), 16000, m["vggish"])
        except MediaError:
            pass
        found = (vis.times if vis else np.zeros(0), vis.features if vis else None,
                 aud.times if aud else np.zeros(0), aud.features if aud else None)
        if uri:
            buf = io.BytesIO()
            np.savez(buf, **{k: v if v is not None else np.zeros(0, np.float32)
                             for k, v in zip(("visual_times", "visual", "audio_times", "audio"), found)})
            write_bytes_atomic(uri, buf.getvalue(), so)
        return found

    def __call__(self, batch: dict) -> dict:
        from aver.recola_data import session_labels

        cfg = self.cfg
        out = {"session": [], "visual": [], "audio": [], "target": []}
        tv, ta = window_shape(cfg["window_s"], cfg["fps"])
        for i in range(len(batch["name"])):
            record = {k: batch[k][i] for k in batch}
            labels = session_labels(record, cfg.get("storage_options") or None)
            duration = len(labels) * STEP_S
            vis_t, vis, aud_t, aud = self._timelines(record)
            for start, end in window_slices(duration, cfg["window_s"], cfg["hop_s"]):
                if end - start < cfg["window_s"] - 1e-6:
                    continue
                lo, hi = int(round((end - cfg["target_s"]) / STEP_S)), int(round(end / STEP_S))
                out["session"].append(record["name"])
                out["visual"].append(take(vis_t, vis, start, end, tv) if vis is not None
                                     else np.zeros((tv, 1920), np.float32))
                out["audio"].append(take(aud_t, aud, start, end, ta) if aud is not None
                                    else np.zeros((ta, 256), np.float32))
                out["target"].append(labels[lo:hi].mean(0).astype(np.float32))
        return {"session": np.asarray(out["session"], dtype=object),
                "visual": np.stack(out["visual"]) if out["visual"] else np.zeros((0, tv, 1920), np.float32),
                "audio": np.stack(out["audio"]) if out["audio"] else np.zeros((0, ta, 256), np.float32),
                "target": np.stack(out["target"]) if out["target"] else np.zeros((0, 2), np.float32)}


def session_windows(cfg: FusionTrainConfig | dict, split: str):
    """Materialised Ray Dataset of fusion windows for the sessions of ``split``."""
    import ray.data
    from dataclasses import asdict

    from aver.datasets import read_recola

    c = asdict(cfg) if not isinstance(cfg, dict) else cfg
    sessions = [r for r in read_recola(c["recola"], c.get("storage_options") or None).records if r["split"] == split]
    if not sessions:
        raise ValueError(f"no {split} sessions under {c['recola']}")
    ds = ray.data.from_items(sessions, override_num_blocks=len(sessions))
    ds = ds.map_batches(SessionFeaturizer, fn_constructor_kwargs={"cfg": c}, batch_size=1, concurrency=1,
                        num_cpus=c.get("featurizer_cpus", 1.0))
    return ds.materialize()


def features_key(cfg: FusionTrainConfig | dict) -> str:
    """Names the feature timelines of one set of models and fps: the checkpoints' content hashes."""
    import hashlib
    from dataclasses import asdict

    c = asdict(cfg) if not isinstance(cfg, dict) else cfg
    h = hashlib.sha256(f"fps={c['fps']}".encode())
    for key in ("student", "vggish_arousal", "vggish_valence"):
        h.update(hashlib.sha256(read_bytes(c[key], c.get("storage_options") or None)).digest())
    return h.hexdigest()[:16]


def build_fusion(config: dict) -> torch.nn.Module:
    from aver.models import FusionModel

    return FusionModel(1920, 256, modalities=tuple(config["modalities"]))


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    model, _, optimizer, start, history, device = prepare_worker(build_fusion, config, optimizer=torch.optim.Adam)
    shard = ray.train.get_dataset_shard("train")
    bs = config["batch_size"]

    def predict(batch):
        return (model(to_device(batch["visual"], device), to_device(batch["audio"], device)),
                to_device(torch.as_tensor(batch["target"]), device))

    # Windows are small and reread every epoch: keep this worker's shard in memory (float16).
    windows = ShardBatches(shard, ("visual", "audio"), torch.as_tensor, bs, cache=True, seed=config["seed"],
                           drop_last=True)
    for epoch in epochs(config, start, optimizer):
        loss, p, t = ccc_epoch(model, optimizer, windows.epoch(epoch), predict, config, epoch)
        metrics = {"loss": loss, "ccc_arousal": ccc(t[:, 0], p[:, 0]), "ccc_valence": ccc(t[:, 1], p[:, 1])}
        history = report_epoch(epoch, metrics, model, optimizer, history)


def run(cfg: FusionTrainConfig) -> list[dict] | None:
    """Featurise the train sessions and train (or resume) the fusion model."""
    if not begin(cfg, "train_fusion"):
        return None
    if cfg.features_cache is None:
        cfg.features_cache = join(cfg.output, "features", features_key(cfg))
    train = session_windows(cfg, "train").select_columns(["visual", "audio", "target"])
    print(f"train_fusion: {train.count()} training windows of {cfg.window_s} s", flush=True)
    require_batches(train.count(), cfg, f"{cfg.window_s} s training windows")
    history = fit(train_loop_per_worker, cfg, {"train": train}, {"modalities": list(cfg.modalities)}, build_fusion)
    print(f"train_fusion: wrote {cfg.model_uri}", flush=True)
    return history
