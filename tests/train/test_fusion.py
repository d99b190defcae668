import json
import os

import numpy as np
import pytest
import torch

from aver.data.features import take, window_slices
from aver.models import FusionModel, Student, VGGishEmotion, load_checkpoint, save_checkpoint
from aver.train.fusion import FusionTrainConfig, run

pytestmark = pytest.mark.timeout(900)


def test_window_slices_and_take():
    assert window_slices(10.0, 4.0, 2.0) == [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0), (6.0, 10.0)]
    assert window_slices(3.0, 4.0, 2.0) == [(0.0, 3.0)]
    times = np.arange(10) * 0.5
    values = np.arange(10, dtype=np.float32)[:, None]
    assert take(times, values, 1.0, 3.0, 4)[:, 0].tolist() == [2, 3, 4, 5]
    assert take(times, values, 1.0, 3.0, 2)[:, 0].tolist() == [2, 4]
    assert take(times, values, 20.0, 30.0, 3).tolist() == [[0], [0], [0]]


def test_train_fusion_on_sessions_with_two_workers(small_corpus, tmp_path, ray_local):
    # The fused model and the visual-only one side by side (DDP over both: every parameter takes a
    # gradient each step; tests/test_docs.py trains all three on one worker).
    features_cache = str(tmp_path / "features")
    torch.manual_seed(0)
    paths = {}
    for name, model in (("student", Student()), ("vggish_arousal", VGGishEmotion()), ("vggish_valence", VGGishEmotion())):
        paths[name] = str(tmp_path / f"{name}.pt")
        save_checkpoint(model, paths[name])
    cfg = FusionTrainConfig(output=str(tmp_path), recola=str(small_corpus / "recola"),
                            student=paths["student"], vggish_arousal=paths["vggish_arousal"],
                            vggish_valence=paths["vggish_valence"], variants=("fused", "visual"), window_s=4.8, hop_s=1.2,
                            epochs=2, batch_size=3, cpus_per_worker=0.5, featurizer_cpus=0.5,
                            features_cache=features_cache, num_workers=2)
    histories = run(cfg)
    assert sorted(histories) == ["fusion", "fusion_visual"] and cfg.name == "fusion+fusion_visual"
    for history in histories.values():
        assert [h["epoch"] for h in history] == [0, 1]
        assert all(np.isfinite(h["loss"]) and -1 <= h["ccc_arousal"] <= 1 for h in history)
    assert histories["fusion"] != histories["fusion_visual"]
    (key,) = os.listdir(features_cache)  # one set of models: the timelines a later run reads
    assert sorted(os.listdir(os.path.join(features_cache, key))) == ["train_1.npz", "train_2.npz"]
    for name, modalities in (("fusion", ("visual", "audio")), ("fusion_visual", ("visual",))):
        model, meta = load_checkpoint(cfg.model_uri(name))
        assert isinstance(model, FusionModel) and model.config.modalities == modalities
        assert json.loads(meta["history"]) == histories[name] and meta["name"] == name
        with torch.no_grad():
            out = model(torch.randn(2, 24, 1920), torch.randn(2, 15, 256))
        assert out.shape == (2, 2) and (out.abs() < 1).all()


def test_too_few_windows_is_a_clear_error(small_corpus, tmp_path, ray_local):
    torch.manual_seed(0)
    paths = {}
    for name, model in (("student", Student()), ("va", VGGishEmotion()), ("vv", VGGishEmotion())):
        paths[name] = str(tmp_path / f"{name}.pt")
        save_checkpoint(model, paths[name])
    cfg = FusionTrainConfig(output=str(tmp_path), name="f", recola=str(small_corpus / "recola"), student=paths["student"],
                            vggish_arousal=paths["va"], vggish_valence=paths["vv"], window_s=9.6, hop_s=0.4,
                            batch_size=64, cpus_per_worker=0.5, featurizer_cpus=0.5)
    with pytest.raises(ValueError, match="cannot fill one batch of 64"):
        run(cfg)
