import re

import pytest
import torch
from torchvision.models import densenet201

from aver.models import Student


def _legacy_keys(state):
    # The real ImageNet file uses 'norm.1'-style keys; write the test file the same way.
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    return {(f"{m.group(1)}.{m.group(2)}" if (m := pat.match(k)) else k): v for k, v in state.items()}


def test_backbone_reproduces_torchvision(tmp_path):
    torch.manual_seed(0)
    tv = densenet201(weights=None).eval()
    path = tmp_path / "densenet201.pth"
    state = _legacy_keys(tv.state_dict())
    assert any(".norm.1." in k for k in state)
    torch.save(state, path)
    captured = {}
    tv.classifier.register_forward_pre_hook(lambda m, args: captured.setdefault("feat", args[0]))
    x = torch.randn(2, 3, 140, 140)
    with torch.no_grad():
        tv(x)
        model = Student.from_imagenet(str(path)).eval()
        out = model(x)
    assert torch.allclose(out.embedding, captured["feat"], atol=1e-5)
    assert out.embedding.shape == (2, 1920)
    assert out.fec.shape == (2, 32) and out.affectnet.shape == (2, 8) and out.distill.shape == (2, 80)


def test_from_imagenet_checks_hash(tmp_path):
    path = tmp_path / "d.pth"
    torch.save(densenet201(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        Student.from_imagenet(str(path), sha256="00000000")


def test_forward_after_a_cached_prefix_equals_the_full_forward():
    torch.manual_seed(0)
    model = Student().eval()
    x = torch.randn(2, 3, 140, 140)
    with torch.no_grad():
        full = model(x)
        cached = model.prefix("transition3")(x)
        assert cached.shape == (2, 896, 4, 4)
        part = model(cached, after="transition3")
    for a, b in zip(full, part):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="unknown student stage"):
        model.prefix("block9")


def test_shared_stage_is_the_deepest_stage_with_equal_weights():
    torch.manual_seed(0)
    a = Student()
    torch.manual_seed(0)
    b = Student()
    assert a.shared_stage(b) == "norm5"
    with torch.no_grad():
        b.backbone.features.denseblock4.denselayer1.conv1.weight.add_(1.0)
    assert a.shared_stage(b) == "transition3"
    b.backbone.features.norm0.running_mean.add_(1.0)  # buffers count too
    assert a.shared_stage(b) == "conv0"
    torch.manual_seed(1)
    assert a.shared_stage(Student()) is None
