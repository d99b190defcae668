import pytest
import torch
from torch import nn

from aver.models import VGGishEmotion


def _torchvggish_layout() -> tuple[nn.Sequential, nn.Sequential]:
    # torchvggish's VGG: features.{0,3,6,8,11,13} convs, embeddings.{0,2,4} linears.
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]
    layers, cin = [], 1
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    emb = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096), nn.ReLU(True),
                        nn.Linear(4096, 128), nn.ReLU(True))
    return nn.Sequential(*layers), emb


def test_conv_stack_reproduces_torchvggish_layout(tmp_path):
    torch.manual_seed(0)
    features, embeddings = _torchvggish_layout()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({f"embeddings.{k}": v for k, v in embeddings.state_dict().items()})
    assert {k.split(".")[1] for k in state if k.startswith("features.")} == {"0", "3", "6", "8", "11", "13"}
    path = tmp_path / "vggish-10086976.pth"
    torch.save(state, path)
    model = VGGishEmotion.from_audioset(str(path)).eval()
    mel = torch.randn(2, 1, 96, 128)
    with torch.no_grad():
        # Up to the last kept conv (features.11 + ReLU): the paper drops conv 13 and the last pool.
        expected = features[:13](mel)
        ours = model.features(mel)
    assert ours.shape == (2, 512, 12, 16)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_outputs_and_frame_features():
    model = VGGishEmotion().eval()
    mel = torch.randn(3, 1, 480, 128)
    with torch.no_grad():
        out = model(mel)
        frames = model.frame_features(mel)
    assert out.embedding.shape == (3, 128)
    assert out.prediction.shape == (3,)
    assert (out.prediction.abs() < 1).all()
    assert frames.shape == (3, 60, 128)


def test_frame_features_pool_frequency_only_and_keep_time_order():
    # Guards against: frame_features pooling over time, max- instead of mean-pooling over
    # frequency, or reversing time (each step must be the MLP of that step's frequency average).
    torch.manual_seed(0)
    model = VGGishEmotion(hidden_dim=64).eval()
    mel = torch.randn(2, 1, 96, 128)
    with torch.no_grad():
        frames = model.frame_features(mel)
        conv = model.features(mel)  # [2, 512, 12, 16]: time 96 / 8, frequency 128 / 8
        expected = torch.stack([model.embeddings(conv[:, :, t, :].mean(dim=-1)) for t in range(conv.shape[2])], 1)
    assert frames.shape == (2, 12, 128)
    assert torch.allclose(frames, expected, atol=1e-5)
    assert not torch.allclose(frames, frames.flip(1), atol=1e-3)  # steps differ, so their order is checked


def test_config_validation_and_documented_defaults():
    from aver.models.vggish import VGGishConfig

    for bad in ({"embedding_dim": 0}, {"hidden_dim": 0}, {"dropout": 1.0}, {"dropout": -0.1}):
        with pytest.raises(ValueError):
            VGGishConfig(**bad)
    VGGishConfig(embedding_dim=1, hidden_dim=1, dropout=0.0)  # the smallest valid sizes
    assert VGGishEmotion().config == VGGishConfig(embedding_dim=128, hidden_dim=4096, dropout=0.2)  # decisions.md
