import pytest
import torch
from facenet_pytorch import InceptionResnetV1

from aver.models import Teacher, TeacherConfig


@pytest.fixture(scope="module")
def facenet_file(tmp_path_factory):
    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=False).eval()
    for m in net.modules():  # non-trivial BN statistics so a wrong mapping shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("w") / "facenet.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_fig1_intermediate_shapes():
    model = Teacher(d_face=128).eval()
    x = torch.randn(2, 3, 140, 140)
    with torch.no_grad():
        trunk = model.trunk(x)
        reduced = model.reduce(trunk)
        dense = model.dense(reduced)
        projected = model.project(dense)
        out = model(x)
    assert trunk.shape == (2, 1792, 3, 3)
    assert reduced.shape == (2, 512, 3, 3)
    assert dense.shape == (2, 832, 3, 3)
    assert projected.shape == (2, 128, 3, 3)
    assert out.embedding.shape == (2, 128) and out.fec.shape == (2, 32) and out.affectnet.shape == (2, 8)
    assert torch.allclose(out.embedding, projected.mean(dim=(2, 3)))
    assert Teacher(d_face=256).eval()(x).embedding.shape == (2, 256)


def test_trunk_reproduces_facenet_pytorch(facenet_file):
    net, path = facenet_file
    captured = {}
    net.mixed_7a.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    x = torch.randn(2, 3, 140, 140)
    with torch.no_grad():
        net(x)
        model = Teacher.from_facenet(str(path)).eval()
        ours = model.trunk(x)
    assert torch.allclose(ours, captured["out"], atol=1e-5)


def test_from_facenet_rejects_other_files(tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="facenet"):
        Teacher.from_facenet(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        Teacher.from_facenet(str(tmp_path / "missing.pt"))


def test_config_validation():
    with pytest.raises(ValueError):
        Teacher(d_face=0)
    with pytest.raises(ValueError):
        TeacherConfig(growth_rate=-1)


def test_teacher_backward_reaches_trunk():
    model = Teacher().train()
    out = model(torch.randn(3, 3, 140, 140))
    (out.fec.sum() + out.affectnet.sum()).backward()
    assert model.trunk.conv2d_1a.conv.weight.grad.abs().sum() > 0


def test_forward_after_the_trunk_equals_the_full_forward():
    torch.manual_seed(0)
    model = Teacher(d_face=128).eval()
    x = torch.randn(2, 3, 140, 140)
    with torch.no_grad():
        full = model(x)
        part = model(model.prefix("trunk")(x), after="trunk")
    for a, b in zip(full, part):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="cut after"):
        model(x, after="dense")
