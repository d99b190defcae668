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
    # frame features average (before the MLP) to what the pooled path sees
    with torch.no_grad():
        pooled = model.features(mel).mean(dim=(2, 3))
        per_step = model.features(mel).mean(dim=3).mean(dim=2)
    assert torch.allclose(pooled, per_step, atol=1e-5)
