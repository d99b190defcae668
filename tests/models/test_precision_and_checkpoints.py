"""Every model under bf16 autocast and channels_last on CPU, and checkpoint round trips."""

import pytest
import torch

from aver.models import FusionModel, Student, Teacher, VGGishEmotion, load_checkpoint, save_checkpoint


def _cases():
    return [
        ("teacher", lambda: Teacher(d_face=256), lambda: (torch.randn(2, 3, 140, 140),)),
        ("student", lambda: Student(), lambda: (torch.randn(2, 3, 140, 140),)),
        ("vggish", lambda: VGGishEmotion(), lambda: (torch.randn(2, 1, 64, 128),)),
        ("fusion", lambda: FusionModel(40, 24), lambda: (torch.randn(2, 30, 40), torch.randn(2, 20, 24))),
        ("fusion-audio", lambda: FusionModel(40, 24, modalities=("audio",)), lambda: (None, torch.randn(2, 20, 24))),
    ]


def _tensors(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name,build,inputs", _cases(), ids=[c[0] for c in _cases()])
def test_bf16_autocast_and_channels_last(name, build, inputs):
    torch.manual_seed(0)
    model = build().eval()
    args = inputs()
    with torch.no_grad():
        ref = _tensors(model(*args))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = _tensors(model(*args))
        if args[0] is not None and args[0].ndim == 4:
            model_cl = model.to(memory_format=torch.channels_last)
            cl = _tensors(model_cl(*[a.contiguous(memory_format=torch.channels_last) for a in args]))
            for r, c in zip(ref, cl):
                assert torch.allclose(r, c, atol=1e-4, rtol=1e-3)
    for r, b in zip(ref, low):
        assert r.shape == b.shape and torch.isfinite(b).all()
        # bf16 keeps ~3 significant digits: outputs stay close to float32 ones.
        scale = r.abs().max().clamp_min(1e-3)
        assert (r - b.float()).abs().max() / scale < 0.1


@pytest.mark.parametrize("name,build,inputs", _cases(), ids=[c[0] for c in _cases()])
def test_checkpoint_round_trip(tmp_path, name, build, inputs):
    torch.manual_seed(1)
    model = build().eval()
    path = tmp_path / "sub" / f"{name}.pt"
    save_checkpoint(model, str(path), meta={"epoch": 3})
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    loaded, meta = load_checkpoint(str(path))
    assert type(loaded) is type(model) and meta == {"epoch": 3}
    assert loaded.config == model.config
    args = inputs()
    with torch.no_grad():
        for a, b in zip(_tensors(model(*args)), _tensors(loaded(*args))):
            assert torch.equal(a, b)
    # the load skipped the random init (skip_init) and put the initialisers back after it: the same
    # seed builds the same weights again (left off, a build would hold whatever memory it was given)
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(build().state_dict().values(), model.state_dict().values()))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not an aver checkpoint"):
        load_checkpoint(str(plain))
    # a checkpoint of an older layout (a fusion model from before its visual input was standardised:
    # no running statistics, its convolutions one index lower) says so and what to do
    save_checkpoint(FusionModel(32, 16), str(tmp_path / "fusion.pt"))
    payload = torch.load(tmp_path / "fusion.pt", weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if "running" not in k
                             and "num_batches" not in k}
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="saved by an aver whose layers differ.*train it again"):
        load_checkpoint(str(tmp_path / "old.pt"))
