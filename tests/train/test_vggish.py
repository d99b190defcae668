import glob
import os

import numpy as np
import pytest
import torch

from aver.data.manifests import read_recola
from aver.models import VGGishEmotion, load_checkpoint
from aver.data.recola import audio_segments, session_labels
from aver.train.vggish import VGGishTrainConfig, run

pytestmark = pytest.mark.timeout(600)


def test_segments_carry_mean_labels(small_corpus):
    record = read_recola(str(small_corpus / "recola")).records[1]
    labels = session_labels(record)
    segs = audio_segments(record, 100, 25)
    assert len(segs) == (300 - 100) // 25 + 1
    assert segs[2]["mel"].shape == (100, 128) and segs[2]["mel"].dtype == np.float32
    assert segs[2]["arousal"] == pytest.approx(float(labels[50:150, 0].mean()), abs=1e-6)
    assert segs[2]["valence"] == pytest.approx(float(labels[50:150, 1].mean()), abs=1e-6)


def test_train_vggish_both_dimensions_on_two_workers(small_corpus, tmp_path, ray_local):
    # The frozen-features recipe, both networks side by side; the documents' test trains the whole
    # networks (one worker).
    cfg = VGGishTrainConfig(output=str(tmp_path), recola=str(small_corpus / "recola"),
                            dimension=("arousal", "valence"), segment_frames=96, hop_frames=24, epochs=2, batch_size=4,
                            lr=1e-4, cpus_per_worker=0.5, freeze="features", seed=3, num_workers=2)
    histories = run(cfg)
    assert sorted(histories) == ["vggish_arousal", "vggish_valence"]
    # each worker encoded its own half of the segments once for both networks (their conv stacks
    # are the same): one part per rank, no row twice
    parts = sorted(glob.glob(str(tmp_path / "cache" / "prefix-*" / "*.keys.npy")))
    assert [os.path.basename(p).split("-")[1] for p in parts] == ["rank0", "rank1"]
    keys = [np.load(p).tolist() for p in parts]
    n = sum(len(audio_segments(r, 96, 24)) for r in read_recola(str(small_corpus / "recola")).records
            if r["split"] == "train")
    assert len(keys[0]) == len(keys[1]) == n // 2 and not set(keys[0]) & set(keys[1])
    torch.manual_seed(3)
    fresh = VGGishEmotion()
    for name, history in histories.items():
        assert [h["epoch"] for h in history] == [0, 1]
        assert all(np.isfinite(h["loss"]) and -1 <= h["ccc"] <= 1 for h in history)
        model, _ = load_checkpoint(cfg.model_uri(name))
        assert isinstance(model, VGGishEmotion)
        with torch.no_grad():
            out = model(torch.randn(3, 1, 96, 128))
        assert out.prediction.shape == (3,) and (out.prediction.abs() < 1).all()
        # the frozen conv stack is the untrained one of the same seed, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(fresh.features.state_dict().values(),
                                                    model.features.state_dict().values()))
        assert not torch.equal(fresh.head.weight, model.head.weight)
    # each learned its own dimension: the two networks differ
    heads = [load_checkpoint(cfg.model_uri(n))[0].head.weight for n in histories]
    assert not torch.equal(*heads)
    assert run(cfg) is None


def test_config_validation(tmp_path):
    with pytest.raises(ValueError):
        VGGishTrainConfig(output=str(tmp_path), name="v", recola="r", dimension="dominance")
    with pytest.raises(ValueError):
        VGGishTrainConfig(output=str(tmp_path), name="v", recola="r", batch_size=1)
