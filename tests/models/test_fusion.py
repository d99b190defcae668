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
    FusionConfig(visual_dim=1, audio_dim=1, steps=1, channels=1, stride=1, hidden=1, layers=1)  # smallest valid
    with pytest.raises(ValueError):
        FusionConfig(stride=0)
    with pytest.raises(ValueError):
        FusionConfig(modalities=("video",))
    with pytest.raises(ValueError):
        FusionConfig(modalities=())
    with pytest.raises(ValueError):
        FusionModel(0, 128)


def test_defaults_take_the_student_embedding_and_one_vggish():
    model = FusionModel().eval()  # decisions.md: visual 1920 (DenseNet201 pooled), audio 128
    with torch.no_grad():
        assert model(torch.randn(2, 48, 1920), torch.randn(2, 30, 128)).shape == (2, 2)


def test_pre_transform_layers_as_decided():
    # decisions.md "Fusion pre-transforms": every 3rd step, k=1 conv to 2x64, k=3 conv, max-pool 2
    # (ceil), k=5 conv to 64, adaptive average pool to 9 steps.
    t = FusionModel(32, 16).visual_transform
    convs = [m for m in t.body if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [
        (32, 128, 1, 0), (128, 128, 3, 1), (128, 64, 5, 2)]
    pools = [m for m in t.body if isinstance(m, torch.nn.MaxPool1d)]
    assert len(pools) == 1 and pools[0].kernel_size == 2 and pools[0].stride == 2 and pools[0].ceil_mode
    assert t.stride == 3


def test_only_every_third_step_is_read():
    torch.manual_seed(0)
    model = FusionModel(8, 8).eval()
    x = torch.randn(1, 30, 8)
    y = x.clone()
    y[:, 1::3] += 5.0  # steps the pre-transform skips
    y[:, 2::3] -= 5.0
    z = x.clone()
    z[:, 0::3] += 5.0  # steps it reads
    with torch.no_grad():
        assert torch.allclose(model.visual_transform(x), model.visual_transform(y))
        assert not torch.allclose(model.visual_transform(x), model.visual_transform(z))


def test_each_window_is_scored_on_its_own():
    # Guards against: the LSTM reading the batch as time (batch_first lost): a window's score would
    # depend on the other windows of its batch.
    torch.manual_seed(0)
    model = FusionModel(8, 8).eval()
    visual, audio = torch.randn(3, 12, 8), torch.randn(3, 6, 8)
    with torch.no_grad():
        together = model(visual, audio)
        alone = torch.cat([model(visual[i:i + 1], audio[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_visual_features_are_standardised_so_a_few_dimensions_cannot_drown_the_rest():
    # Guards against (issue 32): the student's embedding projected unscaled, where valence lies in
    # low-variance directions (a ridge probe of session frames: valence CCC 0.30 unscaled, 0.76 scaled).
    torch.manual_seed(0)
    t = FusionModel(32, 16).visual_transform.train()
    x = torch.randn(8, 30, 32)
    scale = torch.rand(32) * 100 + 0.5
    assert torch.allclose(t(x), t(x * scale), atol=1e-4)
    a = torch.randn(8, 30, 16)
    audio = FusionModel(32, 16).audio_transform.train()  # VGGish's features are read as they are
    assert not torch.allclose(audio(a), audio(a * scale[:16]), atol=1e-4)
