import pytest
import torch

from aver.models import FusionConfig, FusionModel


def test_fig3_internals_and_output():
    model = FusionModel(1920, 128).eval()
    visual, audio = torch.randn(4, 96, 1920), torch.randn(4, 60, 128)
    with torch.no_grad():
        v = model.visual_transform(visual)
        a = model.audio_transform(audio)
        out = model(visual, audio)
    assert v.shape == (4, 9, 64) and a.shape == (4, 9, 64)
    assert torch.cat([v, a], dim=2).shape == (4, 9, 128)
    assert model.lstm.input_size == 128 and model.lstm.hidden_size == 256 and model.lstm.num_layers == 2
    assert out.shape == (4, 2)
    assert (out.abs() < 1).all()


@pytest.mark.parametrize("modality", ["visual", "audio"])
def test_single_modality_variants(modality):
    model = FusionModel(32, 16, modalities=(modality,)).eval()
    visual, audio = torch.randn(2, 20, 32), torch.randn(2, 12, 16)
    with torch.no_grad():
        out = model(visual if modality == "visual" else None, audio if modality == "audio" else None)
    assert out.shape == (2, 2)
    assert model.lstm.input_size == 64
    other = "audio" if modality == "visual" else "visual"
    assert getattr(model, f"{other}_transform") is None
    with pytest.raises(ValueError):
        model(None, None)


def test_short_and_long_windows_give_nine_steps():
    model = FusionModel(8, 8).eval()
    for t in (1, 5, 27, 300):
        assert model.visual_transform(torch.randn(1, t, 8)).shape == (1, 9, 64)


def test_config_validation():
    with pytest.raises(ValueError):
        FusionConfig(modalities=("video",))
    with pytest.raises(ValueError):
        FusionConfig(modalities=())
    with pytest.raises(ValueError):
        FusionModel(0, 128)
