import json

import pytest
import torch

from aver.evaluate import EvaluateConfig, run
from aver.models import FusionModel, Student, VGGishEmotion, save_checkpoint

pytestmark = pytest.mark.timeout(900)


def test_evaluate_writes_the_paper_metrics(small_corpus, tmp_path, ray_local):
    torch.manual_seed(0)
    models = tmp_path / "models"
    save_checkpoint(Student(), str(models / "student.pt"))
    save_checkpoint(VGGishEmotion(), str(models / "vggish_arousal.pt"))
    save_checkpoint(VGGishEmotion(), str(models / "vggish_valence.pt"))
    save_checkpoint(FusionModel(1920, 256), str(models / "fusion.pt"))
    save_checkpoint(FusionModel(1920, 256, modalities=("audio",)), str(models / "fusion_audio.pt"))
    metrics = run(EvaluateConfig(models=str(models), data=str(small_corpus), output=str(tmp_path / "eval"),
                                 window_s=4.8))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == metrics
    assert 0 <= saved["affectnet_accuracy"] <= 1 and 0 <= saved["fec_triplet_accuracy"] <= 1
    assert set(saved["ccc"]) == {"arousal", "valence"}
    assert set(saved["ccc"]["arousal"]) == {"fused", "audio"}  # no visual-only model given
    assert all(-1 <= v <= 1 for d in saved["ccc"].values() for v in d.values())
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| affectnet_accuracy |" in table and "0.616" in table and "| ccc.valence.fused |" in table
